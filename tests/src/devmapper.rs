//! A device-mapper thin pool on two sparse files (through loop devices),
//! for containerd's devmapper snapshotter, removed again when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::containerd::Containerd;
use crate::{host, Env, Scratch};

pub struct ThinPool {
    pub name: String,
    loops: Vec<String>,
}

impl ThinPool {
    /// A pool `name` of `data_mib` in `dir` (as containerd's docs make one:
    /// 64 KiB blocks, a low-water mark of 32768 blocks, no zeroing).
    pub fn new(dir: &Path, name: &str, data_mib: u64) -> ThinPool {
        // The test host runs no udev, which Debian's dmsetup leaves the
        // /dev/mapper nodes to: have it (and containerd's dmsetup, which
        // inherits this) make them itself.
        std::env::set_var("DM_DISABLE_UDEV", "1");
        // One left over from a killed run.
        let _ = Command::new("dmsetup").args(["remove", "--force", name]).output();
        std::fs::create_dir_all(dir).unwrap();
        let (data, meta) = (dir.join("data"), dir.join("meta"));
        for (f, mib) in [(&data, data_mib), (&meta, 64)] {
            std::fs::File::create(f).unwrap().set_len(mib << 20).unwrap();
        }
        let attach = |f: &PathBuf| host(Command::new("losetup").args(["--find", "--show"]).arg(f)).trim().to_string();
        let (data_dev, meta_dev) = (attach(&data), attach(&meta));
        let table =
            format!("0 {} thin-pool {meta_dev} {data_dev} 128 32768 1 skip_block_zeroing", (data_mib << 20) / 512);
        host(Command::new("dmsetup").args(["create", name, "--table", &table]));
        ThinPool { name: name.to_string(), loops: vec![data_dev, meta_dev] }
    }

    /// containerd's configuration of its devmapper snapshotter on this pool,
    /// keeping its metadata in `root`.
    pub fn containerd_config(&self, root: &Path) -> String {
        format!(
            "[plugins.\"io.containerd.snapshotter.v1.devmapper\"]\n  pool_name = \"{}\"\n  root_path = \"{}\"\n  base_image_size = \"128MB\"\n  discard_blocks = true\n  fs_type = \"ext4\"\n",
            self.name,
            root.display()
        )
    }

    /// Starts containerd (see [`Containerd::start_configured`]) with its
    /// devmapper snapshotter on this pool, and imports the busybox image
    /// into that snapshotter too.
    pub fn containerd(&self, env: &Env, scratch: &Scratch, hearth_extra: &str) -> Containerd {
        let c = Containerd::start_configured(
            env,
            scratch,
            hearth_extra,
            &self.containerd_config(&scratch.path("devmapper")),
        );
        c.ok(&["images", "import", "--snapshotter", "devmapper", &env.busybox_image.display().to_string()]);
        c
    }

    /// The thin devices in the pool (containerd's snapshots), as
    /// `/dev/mapper` paths.
    pub fn devices(&self) -> Vec<PathBuf> {
        let out = host(Command::new("dmsetup").args(["ls", "--target", "thin"]));
        out.lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-snap-", self.name)))
            .map(|n| Path::new("/dev/mapper").join(n))
            .collect()
    }
}

impl Drop for ThinPool {
    fn drop(&mut self) {
        for d in self.devices() {
            let _ = Command::new("dmsetup").arg("remove").arg(&d).output();
        }
        let _ = Command::new("dmsetup").args(["remove", &self.name]).output();
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).output();
        }
    }
}
