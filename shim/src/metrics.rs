//! The agent's cgroup statistics as containerd's cgroups v2 `Metrics`
//! (what `ctr task metrics`, `nerdctl stats` and the CRI's stats read).

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use hearth_agent_protocol::agent as pb;

/// The type containerd decodes the `Any` as.
pub const TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn to_containerd(s: &pb::StatsResponse) -> Result<Any, containerd_shim::protos::protobuf::Error> {
    let mut m = Metrics::new();
    m.pids = Some(PidsStat { current: s.pids.current, limit: s.pids.limit, ..Default::default() }).into();
    m.cpu = Some(CPUStat {
        usage_usec: s.cpu.usage_usec,
        user_usec: s.cpu.user_usec,
        system_usec: s.cpu.system_usec,
        nr_periods: s.cpu.nr_periods,
        nr_throttled: s.cpu.nr_throttled,
        throttled_usec: s.cpu.throttled_usec,
        ..Default::default()
    })
    .into();
    let stat = |k: &str| s.memory.stat.get(k).copied().unwrap_or(0);
    m.memory = Some(MemoryStat {
        usage: s.memory.usage_bytes,
        usage_limit: s.memory.limit_bytes,
        max_usage: s.memory.max_usage_bytes,
        anon: stat("anon"),
        file: stat("file"),
        ..Default::default()
    })
    .into();
    m.memory_events =
        Some(MemoryEvents { oom: s.memory.oom_events, oom_kill: s.memory.oom_kill_events, ..Default::default() })
            .into();
    m.io = Some(IOStat {
        usage: vec![IOEntry {
            rbytes: s.io.read_bytes,
            wbytes: s.io.write_bytes,
            rios: s.io.read_ios,
            wios: s.io.write_ios,
            ..Default::default()
        }],
        ..Default::default()
    })
    .into();
    Ok(Any { type_url: TYPE_URL.into(), value: m.write_to_bytes()?, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_figures_reach_containerds_fields() {
        let mut s = pb::StatsResponse::new();
        s.pids.mut_or_insert_default().current = 3;
        s.cpu.mut_or_insert_default().usage_usec = 1234;
        let mem = s.memory.mut_or_insert_default();
        mem.usage_bytes = 4096;
        mem.limit_bytes = 1 << 25;
        mem.oom_kill_events = 1;
        mem.stat.insert("anon".into(), 100);
        s.io.mut_or_insert_default().write_bytes = 77;
        let any = to_containerd(&s).unwrap();
        assert_eq!(any.type_url, TYPE_URL);
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.cpu.usage_usec, 1234);
        assert_eq!((m.memory.usage, m.memory.usage_limit, m.memory.anon, m.memory.file), (4096, 1 << 25, 100, 0));
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.io.usage[0].wbytes, 77);
    }
}
