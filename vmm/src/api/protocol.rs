//! Requests and replies of the control socket, one JSON object per line.
//!
//! ```text
//! {"op":"info"}                                -> {"info":{...VmInfo}}
//! {"op":"pause"} / {"op":"resume"}             -> "done"
//! {"op":"set-balloon","target_mib":128}        -> "done"
//! {"op":"attach-disk","id":"ubuntu","read_only":false}   + image fd
//!                                              -> {"attached":{...DiskInfo}}
//! {"op":"detach-disk","id":"ubuntu"}           -> {"detached":{...DiskInfo}}
//! {"op":"attach-nic","id":"c1-eth0"}  + tap fd  -> {"nic-attached":{...NicInfo}}
//! {"op":"detach-nic","id":"c1-eth0"}           -> {"nic-detached":{...NicInfo}}
//! any failure                                  -> {"error":"what and what to do"}
//! ```

use serde::{Deserialize, Serialize};

use crate::devices::virtio::block::DiskStats;
use crate::devices::virtio::nic_slot::NetStats;

/// Longest request line the server reads.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The VM's state, its disks and their counters. (Variants without
    /// options are empty structs so that unknown fields are refused.)
    Info {},
    /// Stops every vCPU between two guest instructions (devices keep
    /// finishing what the guest already queued).
    Pause {},
    Resume {},
    /// Asks the guest to hold `target_mib` of its memory in the balloon.
    SetBalloon {
        target_mib: u64,
    },
    /// Attaches the image sent with the request to a free disk slot; the
    /// guest sees it as the slot's disk with serial `id`.
    AttachDisk {
        id: String,
        #[serde(default)]
        read_only: bool,
    },
    /// Empties the slot holding disk `id` (unmount it in the guest first:
    /// its I/O fails from here on).
    DetachDisk {
        id: String,
    },
    /// Attaches the tap sent with the request (opened IFF_TAP | IFF_NO_PI,
    /// without IFF_VNET_HDR, in whatever network namespace the caller
    /// chose) to a free NIC slot: the guest sees that NIC's link come up.
    AttachNic {
        id: String,
    },
    /// Empties the slot holding NIC `id`: its link goes down, and no frame
    /// reaches the tap from the reply on.
    DetachNic {
        id: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Info(VmInfo),
    Done,
    Attached(DiskInfo),
    /// The disk as it was just before it was detached, with its counters.
    Detached(DiskInfo),
    NicAttached(NicInfo),
    /// The NIC as it was just before it was detached, with its counters.
    NicDetached(NicInfo),
    Error(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Running,
    Paused,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub balloon: Option<BalloonInfo>,
    /// Every virtio-blk device, in the order the guest probes them (the
    /// `--disk` disks first, then the slots).
    pub disks: Vec<DiskInfo>,
    /// Every virtio-net device, in the order the guest probes them (the
    /// `--net` NICs first, then the slots).
    #[serde(default)]
    pub nics: Vec<NicInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    pub target_mib: u64,
    /// What the guest says the balloon holds.
    pub actual_mib: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Position among the virtio-blk devices (0 is the first the guest probes).
    pub index: usize,
    /// A slot of `--disk-slots` (attachable), or a disk given with `--disk`.
    pub slot: bool,
    /// The serial the guest reads from /sys/block/vdX/serial; None when empty.
    pub id: Option<String>,
    pub read_only: bool,
    pub size_bytes: u64,
    pub stats: DiskStats,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicInfo {
    /// Position among the virtio-net devices (0 is the first the guest probes).
    pub index: usize,
    /// A slot of `--nic-slots` (attachable), or a NIC given with `--net`.
    pub slot: bool,
    /// What the attachment is called (a `--net` NIC's is its tap's name);
    /// None when empty.
    pub id: Option<String>,
    /// The MAC in the device's config space, as the guest first sees it
    /// (the guest may set another on its interface).
    pub mac: String,
    /// Whether the guest sees a carrier: a tap is attached.
    pub link_up: bool,
    pub stats: NetStats,
}
