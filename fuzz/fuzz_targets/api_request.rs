//! Fuzzes the VMM's control socket: whatever a host client sends, through
//! the real server (`api::server::serve`: the request line read from a
//! Unix socket, with or without a descriptor beside it) into the real
//! `Control` of two disk slots, one fixed disk, two NIC slots and a
//! balloon, whose state carries over from input to input (attaches and
//! detaches accumulate). No tap is ever sent (the fuzzer makes no network
//! interfaces): attach-nic meets images, directories and nothing, which it
//! must refuse.
//!
//! Input: a flags byte (bit 0: send an image descriptor with the request,
//! bits 1-2: which one: a sparse 1 MiB image, a second one, the fixed
//! disk's image, a directory), then the bytes sent, cut or not by an end
//! of line; about half the inputs start from a well-formed request with
//! fuzzed fields so that attach and detach are reached often.
//!
//! Oracles: no panic or hang; every reply is one line of valid JSON that
//! decodes as a `Reply`; an error reply never changes the disks; never more
//! than the slots' worth of disks attached, never one image twice.

#![no_main]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use hearth_vmm::api::control::{BalloonDevice, Control, DiskDevice, NicDevice};
use hearth_vmm::api::protocol::Reply;
use hearth_vmm::devices::virtio::balloon::{Balloon, BalloonConfig};
use hearth_vmm::devices::virtio::block::{Block, DiskConfig};
use hearth_vmm::devices::virtio::mmio::MmioTransport;
use hearth_vmm::devices::virtio::net::Net;
use hearth_vmm::devices::virtio::VirtioDevice;
use hearth_vmm::vstate::run_control::RunControl;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

struct World {
    control: Control,
    images: [PathBuf; 4],
}

fn transport(dev: Box<dyn VirtioDevice>) -> Arc<MmioTransport> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
    Arc::new(MmioTransport::new(dev, mem, EventFd::new(0).unwrap()).unwrap())
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hearth-fuzz-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = |name: &str| {
            let p = dir.join(name);
            File::create(&p).unwrap().set_len(1 << 20).unwrap();
            p
        };
        let images = [image("a.img"), image("b.img"), image("fixed.img"), dir.clone()];
        let fixed = Block::new(DiskConfig { path: images[2].clone(), read_only: false }).unwrap();
        let mut disks =
            vec![DiskDevice { slot: fixed.shared(), transport: transport(Box::new(fixed)), hotplug: false }];
        for _ in 0..2 {
            let b = Block::slot();
            disks.push(DiskDevice { slot: b.shared(), transport: transport(Box::new(b)), hotplug: true });
        }
        let balloon = Balloon::new(BalloonConfig { free_page_reporting: true });
        let size = balloon.size();
        let control = Control {
            run: Arc::new(RunControl::default()),
            vcpus: 1,
            memory_mib: 256,
            disks,
            nics: (0..2)
                .map(|i| {
                    let n = Net::slot(i).unwrap();
                    let (nic, mac) = (n.shared(), n.mac());
                    NicDevice { transport: transport(Box::new(n)), nic, mac, hotplug: true }
                })
                .collect(),
            balloon: Some(BalloonDevice { transport: transport(Box::new(balloon)), size }),
            changes: Default::default(),
        };
        World { control, images }
    })
}

const TEMPLATES: &[&str] = &[
    r#"{"op":"attach-disk","id":"#,
    r#"{"op":"detach-disk","id":"#,
    r#"{"op":"set-balloon","target_mib":"#,
    r#"{"op":"info"#,
    r#"{"op":"pause"#,
    r#"{"op":"attach-nic","id":"#,
    r#"{"op":"detach-nic","id":"#,
];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let w = world();
    let mut line = Vec::new();
    if flags & 0x80 != 0 && !rest.is_empty() {
        line.extend_from_slice(TEMPLATES[rest[0] as usize % TEMPLATES.len()].as_bytes());
        line.extend_from_slice(&rest[1..]);
    } else {
        line.extend_from_slice(rest);
    }
    if flags & 0x40 != 0 {
        line.push(b'\n');
    }
    let file = (flags & 1 != 0).then(|| {
        let path = &w.images[(flags as usize >> 1) & 3];
        OpenOptions::new().read(true).write(flags & 8 != 0 && path.is_file()).open(path).unwrap()
    });

    let before = w.control.info().disks;
    let (client, server) = UnixStream::pair().unwrap();
    let sent = match &file {
        Some(f) if !line.is_empty() => client.send_with_fd(&line[..], f.as_raw_fd()).unwrap_or(0),
        _ => 0,
    };
    let _ = (&client).write_all(&line[sent.min(line.len())..]);
    let _ = client.shutdown(std::net::Shutdown::Write);
    hearth_vmm::api::server::serve(server, &w.control);
    let mut reply = String::new();
    (&client).read_to_string(&mut reply).unwrap();

    if reply.is_empty() {
        assert!(line.is_empty(), "no reply to {line:?}");
        return;
    }
    assert!(reply.ends_with('\n') && reply.matches('\n').count() == 1, "{reply:?}");
    let reply: Reply = serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"));
    let after = w.control.info().disks;
    if matches!(reply, Reply::Error(_)) {
        let ids = |d: &[hearth_vmm::api::DiskInfo]| d.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&before), ids(&after), "an error reply changed the disks: {reply:?}");
    }
    let nics = w.control.info().nics;
    assert!(nics.iter().all(|n| n.id.is_none() && !n.link_up), "a NIC attached without a tap: {reply:?}");
    let attached: Vec<_> = after.iter().filter_map(|d| d.id.clone()).collect();
    let mut unique = attached.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), attached.len(), "two disks with one id: {attached:?}");
    assert!(attached.len() <= 3);
});
