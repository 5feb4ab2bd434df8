//! What this host offers: CPUs, memory, disk, drivers.

use model::api::RegisterHost;

use crate::AgentConfig;

/// `cpus` × `ratio`, rounded down, at least 1 and at most the API's bound.
fn schedulable_vcpus(cpus: u32, ratio: f64) -> u32 {
    let max = cpus.saturating_mul(model::api::MAX_CPU_ALLOCATION_RATIO);
    let v = (f64::from(cpus) * ratio).floor();
    if v.is_nan() || v < 1.0 {
        1
    } else if v >= f64::from(max) {
        max
    } else {
        // In range 1..max, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        {
            v as u32
        }
    }
}

/// The registration body for this host.
pub fn registration(
    cfg: &AgentConfig,
    nbd: std::net::SocketAddr,
    link: std::net::SocketAddr,
) -> RegisterHost {
    let measured = || crate::HostResources {
        cpus: std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1),
        memory_mib: mem_total_mib().unwrap_or(1024),
        disk_gib: disk_free_gib(&cfg.data_dir).unwrap_or(0),
    };
    let res = cfg.resources.unwrap_or_else(measured);
    let mut drivers = Vec::new();
    match cfg.driver.name() {
        "qemu" => {
            if which("qemu-system-x86_64") {
                drivers.push("qemu".to_owned());
                drivers.push(match cfg.accel.resolve() {
                    compute::Accel::Kvm => "kvm".to_owned(),
                    _ => "tcg".to_owned(),
                });
            }
        }
        other => drivers.push(other.to_owned()),
    }
    RegisterHost {
        name: cfg.host_name.clone(),
        cpus: res.cpus,
        vcpus: Some(schedulable_vcpus(res.cpus, cfg.cpu_allocation_ratio)),
        memory_mib: res.memory_mib,
        disk_gib: res.disk_gib,
        drivers,
        agent_url: None,
        nbd_addr: Some(nbd.to_string()),
        link_addr: Some(link.to_string()),
        uplink_ip: cfg.uplink_ip.map(|ip| ip.to_string()),
    }
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// `MemTotal` from /proc/meminfo.
fn mem_total_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total_kib(&s).map(|kib| kib / 1024)
}

fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn disk_free_gib(dir: &std::path::Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let bytes = st.blocks_available().saturating_mul(st.fragment_size());
    Some(bytes >> 30)
}

#[cfg(test)]
mod tests {
    #[test]
    fn vcpus_are_cpus_times_the_ratio_within_bounds() {
        use super::schedulable_vcpus as v;
        assert_eq!(v(2, 4.0), 8);
        assert_eq!(v(3, 1.5), 4);
        assert_eq!(v(2, 0.1), 1);
        assert_eq!(v(2, 1000.0), 128);
        assert_eq!(v(2, f64::NAN), 1);
    }

    use super::*;

    #[test]
    fn parses_meminfo() {
        let s = "MemTotal:       24588644 kB\nMemFree:        1 kB\n";
        assert_eq!(parse_mem_total_kib(s), Some(24_588_644));
        assert_eq!(parse_mem_total_kib("garbage"), None);
    }

    #[test]
    fn registration_is_valid_for_the_server() {
        let dir = std::env::temp_dir();
        let cfg = AgentConfig::new("http://127.0.0.1:1", "t", "host-a", dir);
        let r = registration(
            &cfg,
            "127.0.0.1:10809".parse().unwrap(),
            "127.0.0.1:7947".parse().unwrap(),
        );
        assert!(r.cpus >= 1);
        assert_eq!(r.link_addr.as_deref(), Some("127.0.0.1:7947"));
        r.validate()
            .expect("the server would accept this registration");
    }

    #[tokio::test]
    async fn a_simulated_host_registers_its_configured_size() {
        let dir = std::env::temp_dir();
        let sim = std::sync::Arc::new(compute::SimDriver::new(compute::SimConfig::default()));
        let cfg = AgentConfig::simulated("http://127.0.0.1:1", "t", "sim-1", dir, sim);
        let r = registration(
            &cfg,
            "127.0.0.1:10809".parse().unwrap(),
            "127.0.0.1:7947".parse().unwrap(),
        );
        assert_eq!((r.cpus, r.vcpus, r.memory_mib), (16, Some(64), 65536));
        assert_eq!(r.drivers, vec!["sim".to_owned()]);
        r.validate().unwrap();
    }
}
