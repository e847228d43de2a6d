//! The boot path: loads the kernel (an ELF vmlinux, entered through PVH when
//! it carries the PVH note, or a bzImage through the 64-bit Linux boot
//! protocol), the initramfs and the command line into guest memory, then
//! writes the boot parameters the chosen protocol expects.

mod params;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, elf::PvhBootCapability, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START};
use crate::arch::regs::EntryPoint;

/// Where the initramfs was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initramfs {
    pub address: u64,
    pub size: u64,
}

/// Which kind of kernel image was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    ElfPvh,
    Elf64,
    BzImage,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("{path} is neither an ELF vmlinux nor a bzImage the loader accepts ({elf}; {bzimage})")]
    UnknownKernelFormat { path: String, elf: String, bzimage: String },
    #[error("loading the kernel {path} failed: {source}")]
    LoadKernel { path: String, source: loader::Error },
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("writing the kernel command line into guest memory failed: {0}")]
    WriteCmdline(loader::Error),
    #[error(
        "the initramfs {path} ({size} bytes) does not fit in guest memory above the kernel; \
         give the VM more memory (--memory)"
    )]
    InitramfsTooBig { path: String, size: u64 },
    #[error("reading the initramfs {path} into guest memory failed: {source}")]
    LoadInitramfs { path: String, source: vm_memory::GuestMemoryError },
    #[error("writing the boot parameters failed: {0}")]
    BootParams(String),
}

/// What the boot vCPU needs to start the kernel.
#[derive(Debug)]
pub struct Loaded {
    pub entry: EntryPoint,
    pub format: KernelFormat,
    pub initramfs: Option<Initramfs>,
}

/// Builds the command line from hearth's defaults followed by `extra`, so a
/// later option given by the user overrides a default one.
pub fn build_cmdline(defaults: &str, extra: &str) -> Result<Cmdline, Error> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    for part in [defaults, extra] {
        if !part.trim().is_empty() {
            cmdline.insert_str(part.trim()).map_err(Error::Cmdline)?;
        }
    }
    Ok(cmdline)
}

/// Loads kernel, initramfs and command line, and writes the boot parameters.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<Loaded, Error> {
    let kpath = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|source| Error::Open { path: kpath.clone(), source })?;

    let (result, format) = match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            let format = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(_) => KernelFormat::ElfPvh,
                _ => KernelFormat::Elf64,
            };
            (r, format)
        }
        Err(loader::Error::Elf(elf_err @ loader::elf::Error::InvalidElfMagicNumber)) => {
            file.seek(SeekFrom::Start(0)).map_err(|source| Error::Open { path: kpath.clone(), source })?;
            match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
                Ok(r) => (r, KernelFormat::BzImage),
                Err(bz) => {
                    return Err(Error::UnknownKernelFormat {
                        path: kpath,
                        elf: elf_err.to_string(),
                        bzimage: bz.to_string(),
                    })
                }
            }
        }
        Err(source) => return Err(Error::LoadKernel { path: kpath, source }),
    };

    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(Error::WriteCmdline)?;
    let cmdline_len = cmdline.as_cstring().map_err(Error::Cmdline)?.as_bytes().len() + 1;

    let kernel_end = result.kernel_load.0 + result.kernel_end;
    let initramfs = match initramfs {
        Some(path) => Some(load_initramfs(mem, mem_size, path, kernel_end, result.setup_header.as_ref())?),
        None => None,
    };

    let entry = match (format, result.pvh_boot_cap) {
        (KernelFormat::ElfPvh, PvhBootCapability::PvhEntryPresent(addr)) => {
            params::write_pvh(mem, mem_size, initramfs).map_err(Error::BootParams)?;
            EntryPoint::Pvh(addr.0)
        }
        (KernelFormat::BzImage, _) => {
            params::write_zero_page(mem, mem_size, result.setup_header, cmdline_len, initramfs)
                .map_err(Error::BootParams)?;
            // startup_64 sits 0x200 bytes into the protected-mode kernel.
            EntryPoint::Linux64(result.kernel_load.0 + 0x200)
        }
        _ => {
            params::write_zero_page(mem, mem_size, None, cmdline_len, initramfs).map_err(Error::BootParams)?;
            EntryPoint::Linux64(result.kernel_load.0)
        }
    };
    Ok(Loaded { entry, format, initramfs })
}

/// Places the initramfs as high as possible in low memory (below the MMIO gap
/// and below what the kernel's setup header says it can reach), page aligned.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
    header: Option<&linux_loader::bootparam::setup_header>,
) -> Result<Initramfs, Error> {
    let p = path.display().to_string();
    let mut file = File::open(path).map_err(|source| Error::Open { path: p.clone(), source })?;
    let size = file.metadata().map_err(|source| Error::Open { path: p.clone(), source })?.len();
    let addr_max = header.map(|h| h.initrd_addr_max as u64).filter(|m| *m != 0).unwrap_or(0x7fff_ffff);
    let top = mem_size.min(MMIO_GAP_START).min(addr_max + 1);
    let address = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(Error::InitramfsTooBig { path: p.clone(), size })?;
    mem.read_exact_volatile_from(GuestAddress(address), &mut file, size as usize)
        .map_err(|source| Error::LoadInitramfs { path: p, source })?;
    Ok(Initramfs { address, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_options_come_after_defaults() {
        let c = build_cmdline("console=ttyS0 quiet", "loglevel=8 init=/bin/sh").unwrap();
        assert_eq!(c.as_cstring().unwrap().to_str().unwrap(), "console=ttyS0 quiet loglevel=8 init=/bin/sh");
    }

    #[test]
    fn overlong_cmdline_is_an_error() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(build_cmdline("console=ttyS0", &long), Err(Error::Cmdline(_))));
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("hearth-vmm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bogus = dir.join("not-a-kernel");
        std::fs::write(&bogus, vec![0x5a; 8192]).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let cmdline = build_cmdline("console=ttyS0", "").unwrap();
        let err = load(&mem, 64 << 20, &bogus, None, &cmdline).unwrap_err();
        assert!(matches!(err, Error::UnknownKernelFormat { .. }), "{err}");
        assert!(err.to_string().contains("not-a-kernel"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initramfs_goes_high_and_page_aligned() {
        let dir = std::env::temp_dir().join(format!("hearth-vmm-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("initrd");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let mem_size = 64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        let i = load_initramfs(&mem, mem_size, &path, 2 << 20, None).unwrap();
        assert_eq!(i.address % 4096, 0);
        assert!(i.address + i.size <= mem_size);
        assert!(mem_size - (i.address + i.size) < 4096);
        let b: u8 = mem.read_obj(GuestAddress(i.address + 9_999)).unwrap();
        assert_eq!(b, 7);
        // Does not fit above a kernel that ends near the top of memory.
        assert!(matches!(
            load_initramfs(&mem, mem_size, &path, mem_size - 4096, None),
            Err(Error::InitramfsTooBig { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
