//! What this host offers: CPUs, memory, disk, drivers.

use model::api::RegisterHost;

use crate::AgentConfig;

/// The registration body for this host.
pub fn registration(
    cfg: &AgentConfig,
    nbd: std::net::SocketAddr,
    link: std::net::SocketAddr,
) -> RegisterHost {
    let cpus = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let mut drivers = Vec::new();
    if which("qemu-system-x86_64") {
        drivers.push("qemu".to_owned());
        drivers.push(match cfg.accel.resolve() {
            compute::Accel::Kvm => "kvm".to_owned(),
            _ => "tcg".to_owned(),
        });
    }
    RegisterHost {
        name: cfg.host_name.clone(),
        cpus,
        memory_mib: mem_total_mib().unwrap_or(1024),
        disk_gib: disk_free_gib(&cfg.data_dir).unwrap_or(0),
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
}
