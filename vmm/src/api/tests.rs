//! The control socket against real devices (MMIO transports over disk
//! slots and a balloon), through the real server and client.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::control::{BalloonDevice, Control, DiskDevice, NicDevice};
use super::protocol::{Reply, Request, VmState};
use super::Client;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::balloon::{Balloon, BalloonConfig};
use crate::devices::virtio::block::{Block, DiskConfig};
use crate::devices::virtio::mmio::MmioTransport;
use crate::vstate::run_control::RunControl;

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("hearth-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.0.join(name);
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn transport(dev: Box<dyn crate::devices::virtio::VirtioDevice>) -> Arc<MmioTransport> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    Arc::new(MmioTransport::new(dev, mem, EventFd::new(0).unwrap()).unwrap())
}

/// A VM's control with one fixed disk (`fixed`, if given) and `slots` slots.
fn control(fixed: Option<PathBuf>, slots: usize, balloon: bool) -> Control {
    let mut disks = Vec::new();
    if let Some(path) = fixed {
        let b = Block::new(DiskConfig { path, read_only: false }).unwrap();
        let slot = b.shared();
        disks.push(DiskDevice { transport: transport(Box::new(b)), slot, hotplug: false });
    }
    for _ in 0..slots {
        let b = Block::slot();
        let slot = b.shared();
        disks.push(DiskDevice { transport: transport(Box::new(b)), slot, hotplug: true });
    }
    let balloon = balloon.then(|| {
        let b = Balloon::new(BalloonConfig { free_page_reporting: true });
        let size = b.size();
        BalloonDevice { transport: transport(Box::new(b)), size }
    });
    Control {
        run: Arc::new(RunControl::default()),
        vcpus: 1,
        memory_mib: 256,
        disks,
        nics: Vec::new(),
        balloon,
        changes: Default::default(),
    }
}

/// What the guest's driver reads: the capacity (sectors) in the config
/// space, and the config generation.
fn guest_view(t: &MmioTransport) -> (u64, u32) {
    let (mut lo, mut hi, mut gen) = ([0u8; 4], [0u8; 4], [0u8; 4]);
    t.read(0x100, &mut lo);
    t.read(0x104, &mut hi);
    t.read(0x0fc, &mut gen);
    let sectors = u32::from_le_bytes(lo) as u64 | (u32::from_le_bytes(hi) as u64) << 32;
    (sectors, u32::from_le_bytes(gen))
}

fn rw(path: &PathBuf) -> File {
    OpenOptions::new().read(true).write(true).open(path).unwrap()
}

fn refused(reply: Reply) -> String {
    match reply {
        Reply::Error(e) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn attach_shows_the_disk_to_the_guest_and_detach_takes_it_away() {
    let dir = TempDir::new("attach");
    let img = dir.image("a.img", 8 << 20);
    let c = control(None, 2, false);
    assert_eq!(guest_view(&c.disks[0].transport), (0, 0), "an empty slot has no capacity");

    let reply = c.handle(Request::AttachDisk { id: "distro-a".into(), read_only: false }, Some(rw(&img)));
    let Reply::Attached(d) = reply else { panic!("{reply:?}") };
    assert_eq!((d.index, d.slot, d.id.as_deref(), d.size_bytes), (0, true, Some("distro-a"), 8 << 20));
    assert_eq!(guest_view(&c.disks[0].transport), ((8 << 20) / 512, 1), "capacity and a new generation");
    assert_eq!(guest_view(&c.disks[1].transport).0, 0, "the other slot is untouched");

    let info = c.info();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.disks.len(), 2);
    assert_eq!(info.disks[0].id.as_deref(), Some("distro-a"));
    assert_eq!(info.disks[1].id, None);

    let Reply::Detached(d) = c.handle(Request::DetachDisk { id: "distro-a".into() }, None) else { panic!() };
    assert_eq!(d.id.as_deref(), Some("distro-a"));
    assert_eq!(guest_view(&c.disks[0].transport), (0, 2));
    assert_eq!(c.info().disks[0].id, None);
    // The slot takes another image.
    let Reply::Attached(d) = c.handle(Request::AttachDisk { id: "b".into(), read_only: true }, Some(rw(&img))) else {
        panic!()
    };
    assert!(d.read_only);
}

#[test]
fn bad_attaches_are_refused_with_what_to_do() {
    let dir = TempDir::new("bad");
    let fixed = dir.image("fixed.img", 1 << 20);
    let img = dir.image("a.img", 1 << 20);
    let other = dir.image("b.img", 1 << 20);
    let odd = dir.image("odd.img", 1000);
    let empty = dir.image("empty.img", 0);
    let c = control(Some(fixed.clone()), 1, false);
    let attach =
        |id: &str, ro: bool, f: Option<File>| c.handle(Request::AttachDisk { id: id.into(), read_only: ro }, f);

    assert!(refused(attach("x", false, None)).contains("descriptor"));
    for bad in ["", "has space", "a/b", "twenty-one-characters", "ü"] {
        assert!(refused(attach(bad, false, Some(rw(&img)))).contains("not an id"), "{bad:?}");
    }
    assert!(refused(attach("x", false, Some(File::open(&img).unwrap()))).contains("opened read-only"));
    assert!(refused(attach("x", false, Some(rw(&odd)))).contains("512-byte sectors"));
    assert!(refused(attach("x", false, Some(rw(&empty)))).contains("512-byte sectors"));
    assert!(refused(attach("x", false, Some(File::open(&dir.0).unwrap())))
        .contains("neither a regular file nor a block device"));
    // The disk given at start is already attached.
    assert!(refused(attach("x", false, Some(rw(&fixed)))).contains("already attached"));

    assert!(matches!(attach("a", false, Some(rw(&img))), Reply::Attached(_)));
    // The same image under another id, or through a hard link: refused.
    assert!(refused(attach("a2", true, Some(File::open(&img).unwrap()))).contains("never attached twice"));
    let link = dir.0.join("link.img");
    std::fs::hard_link(&img, &link).unwrap();
    assert_eq!(std::fs::metadata(&link).unwrap().ino(), std::fs::metadata(&img).unwrap().ino());
    assert!(refused(attach("a3", false, Some(rw(&link)))).contains("never attached twice"));
    // Same id, another image.
    assert!(refused(attach("a", false, Some(rw(&other)))).contains("already attached"));
    // No free slot.
    assert!(refused(attach("b", false, Some(rw(&other)))).contains("--disk-slots"));

    assert!(refused(c.handle(Request::DetachDisk { id: "nope".into() }, None)).contains("\"a\""));
    assert!(refused(c.handle(Request::DetachDisk { id: "fixed.img".into() }, None)).contains("--disk"));
    assert!(refused(c.handle(Request::Info {}, Some(rw(&other)))).contains("takes no file"));
    assert!(refused(c.handle(Request::SetBalloon { target_mib: 1 }, None)).contains("--balloon"));
}

#[test]
fn balloon_target_is_announced_to_the_guest() {
    let c = control(None, 0, true);
    assert!(refused(c.handle(Request::SetBalloon { target_mib: 256 }, None)).contains("all of the guest's"));
    assert_eq!(c.handle(Request::SetBalloon { target_mib: 64 }, None), Reply::Done);
    let b = c.balloon.as_ref().unwrap();
    let mut num_pages = [0u8; 4];
    b.transport.read(0x100, &mut num_pages);
    assert_eq!(u32::from_le_bytes(num_pages), 64 * 256);
    assert_eq!(c.info().balloon.unwrap().target_mib, 64);
}

#[test]
fn the_socket_serves_the_typed_client_and_answers_garbage_with_errors() {
    use std::io::{BufRead, BufReader, Write};
    let dir = TempDir::new("socket");
    let img = dir.image("a.img", 1 << 20);
    let path = dir.0.join("api.sock");
    let listener = super::server::bind(&path).unwrap();
    assert!(super::server::bind(&path).unwrap_err().to_string().contains("remove it"));
    super::server::spawn(listener, Arc::new(control(None, 1, false))).unwrap();

    let client = Client::new(&path);
    let d = client.attach_disk_path(&img, "disk1", false).unwrap();
    assert_eq!(d.size_bytes, 1 << 20);
    assert_eq!(client.info().unwrap().disks[0].id.as_deref(), Some("disk1"));
    let err = client.attach_disk_path(&img, "disk2", false).unwrap_err().to_string();
    assert!(err.contains("never attached twice"), "{err}");
    assert!(client.detach_disk("disk1").is_ok());
    assert!(client
        .attach_disk_path(&dir.0.join("missing.img"), "x", false)
        .unwrap_err()
        .to_string()
        .contains("missing.img"));

    let raw = |bytes: &[u8]| {
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        line
    };
    assert!(raw(b"not json\n").contains("bad request"));
    assert!(raw(b"{\"op\":\"format-host\"}\n").contains("bad request"));
    assert!(raw(b"{\"op\":\"info\",\"extra\":1}\n").contains("bad request"));
    // A misspelt option is not silently dropped.
    assert!(raw(b"{\"op\":\"attach-disk\",\"id\":\"a\",\"readonly\":true}\n").contains("bad request"));
    assert!(raw(b"{\"op\":\"pause\",\"now\":true}\n").contains("bad request"));
    assert!(raw(b"{\"op\":\"info\"}").contains("end of line"));
    assert!(raw(&vec![b' '; 70 << 10]).contains("longer than"));
    assert_eq!(raw(b""), "", "a client that sends nothing gets nothing");
    // Still serving after all that.
    assert_eq!(client.info().unwrap().disks.len(), 1);
    let nonexistent = Client::new(dir.0.join("nope.sock")).info().unwrap_err().to_string();
    assert!(nonexistent.contains("--api-socket"), "{nonexistent}");
}

/// A VM's control with `slots` NIC slots (and no disk).
fn control_with_nic_slots(slots: u8) -> Control {
    let mut c = control(None, 0, false);
    for i in 0..slots {
        let dev = crate::devices::virtio::net::Net::slot(i).unwrap();
        let (nic, mac) = (dev.shared(), dev.mac());
        c.nics.push(NicDevice { transport: transport(Box::new(dev)), nic, mac, hotplug: true });
    }
    c
}

/// What the guest's driver reads of a NIC: the link status in the config space.
fn link_up(t: &MmioTransport) -> bool {
    let mut status = [0u8; 2];
    t.read(0x100 + 6, &mut status);
    u16::from_le_bytes(status) & 1 == 1
}

#[test]
fn nic_slots_start_empty_with_their_link_down_and_refuse_what_is_not_a_tap() {
    let c = control_with_nic_slots(2);
    let info = c.info();
    assert_eq!(info.nics.len(), 2);
    assert_eq!(info.nics[1].mac, "02:68:65:00:00:01");
    assert!(info.nics.iter().all(|n| n.slot && n.id.is_none() && !n.link_up), "{info:?}");
    assert!(!link_up(&c.nics[0].transport), "the guest sees no carrier");

    let attach = |id: &str, f: Option<File>| c.handle(Request::AttachNic { id: id.into() }, f);
    assert!(refused(attach("n1", None)).contains("tap's open file descriptor"));
    let not_a_tap = File::open("/dev/null").unwrap();
    let e = refused(attach("n1", Some(not_a_tap)));
    assert!(e.contains("not a tap"), "{e}");
    assert!(refused(attach("a/b", None)).contains("not an id"));
    let e = refused(c.handle(Request::DetachNic { id: "n1".into() }, None));
    assert!(e.contains("no attached NIC has id \"n1\""), "{e}");
    assert!(c.info().nics.iter().all(|n| !n.link_up), "refusals change nothing");
}
