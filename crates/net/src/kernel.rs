//! The in-kernel datapath: the BPF classifier of `bpf/classifier.c` at tc ingress and egress
//! of each VM NIC (a tap, or a veth in the tests). It counts every frame, forwards a frame
//! between two VMs of the host on one bridge itself (straight to the destination's tap), and
//! leaves every other frame to the Linux bridge.
//!
//! The program is compiled by clang at build time (`build.rs`) and embedded here. One
//! instance per host (switch): [`KernelDatapath::open`] loads it with `bpftool prog loadall`
//! and pins its programs and maps under `<root>/<name>/{progs,maps}`, where root is a bpffs
//! mounted at [`BPF_ROOT`] (not `/sys/fs/bpf`: `ip netns exec` remounts `/sys`, which would
//! hide the pins from agents and tools running in a namespace). Every NIC of the host shares
//! the instance's maps, so the counters survive NICs coming and going (migrations) and the
//! agent restarting: they live as long as the pins do, with the epoch chosen at load time
//! stored in the `meta` map.
//!
//! Why bpftool and tc rather than a loader crate: loading, attaching and map access go
//! through the tools' command lines, so vinfra needs no `unsafe` (the bpf(2) syscall takes raw
//! pointers) and no new dependency; only the control path pays a process spawn per operation
//! (a few per second at most), never the data path.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::core::FlowRecord;
use crate::types::{ClassCounters, Counter, MacAddr, TrafficClass};

/// The classifier, as compiled from `bpf/classifier.c` by `build.rs`.
pub const CLASSIFIER_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/classifier.o"));

/// Where vinfra mounts its bpffs.
pub const BPF_ROOT: &str = "/run/vinfra/bpf";

/// Row indexes of the `counters` map (see `bpf/classifier.c`).
const ROW_FLOOD: u32 = 3;
const ROW_NEIGHBOR: u32 = 4;
const ROW_ERRORS: u32 = 5;
const ROW_PAIRS_FULL: u32 = 6;

/// `addrs` map values.
const ADDR_LOCAL: u32 = 1;
const ADDR_REMOTE: u32 = 2;

/// `meta` slots (see `bpf/classifier.c`).
const META_EPOCH: u32 = 0;
const META_GENERATION: u32 = 1;
const META_AGEING_ROUND: u32 = 2;
const META_BRIDGE_ONLY: u32 = 3;

/// Maps an instance loaded by an older vinfra lacks: it is upgraded in place
/// ([`KernelDatapath::open_in`]).
const NEW_MAPS: [&str; 2] = ["taps", "fwd"];
/// The maps whose contents an upgrade keeps: what was counted, the address table and the
/// epoch. `taps`/`fwd` are refilled as the agent attaches its taps again.
const KEPT_MAPS: [&str; 4] = ["addrs", "counters", "pairs", "meta"];

/// A tool failed or answered something unexpected.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A tool could not be started at all.
    #[error("cannot run {tool} (install clang, bpftool and iproute2: bash scripts/setup.sh)")]
    Spawn {
        /// The tool.
        tool: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tool exited with an error.
    #[error("{command}: {stderr}")]
    Tool {
        /// The command line.
        command: String,
        /// What it said.
        stderr: String,
    },
    /// A tool's JSON output was not what the classifier's maps hold.
    #[error("unexpected output of {command}: {detail}")]
    Output {
        /// The command line.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// A file operation on the pin directory failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// An instance name that is not a plain file name.
    #[error("invalid datapath name {0:?}: use letters, digits, '.', '_' and '-'")]
    Name(String),
}

fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, KernelError> {
    let command = format!("{tool} {}", args.join(" "));
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| KernelError::Spawn { tool, source })?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(input.as_bytes())
            .map_err(|source| KernelError::Spawn { tool, source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| KernelError::Spawn { tool, source })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        return Err(KernelError::Tool { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip`/`tc` arguments, prefixed with `-n NETNS` when given.
fn in_ns<'a>(netns: Option<&'a str>, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = Vec::with_capacity(args.len() + 2);
    if let Some(ns) = netns {
        v.extend(["-n", ns]);
    }
    v.extend_from_slice(args);
    v
}

/// `bpftool ARGS`, in `netns` when given (bpftool has no namespace option; `ip netns exec`
/// still sees the pins, which live outside `/sys`: see [`BPF_ROOT`]).
fn bpftool(netns: Option<&str>, args: &[&str]) -> Result<String, KernelError> {
    match netns {
        None => run("bpftool", args, None),
        Some(ns) => {
            let mut v = vec!["netns", "exec", ns, "bpftool"];
            v.extend_from_slice(args);
            run("ip", &v, None)
        }
    }
}

/// The two places the classifier runs on a NIC.
#[derive(Clone, Copy, Debug)]
enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    const ALL: [Hook; 2] = [Hook::Ingress, Hook::Egress];

    fn prog(self) -> &'static str {
        match self {
            Hook::Ingress => "vinfra_ingress",
            Hook::Egress => "vinfra_egress",
        }
    }

    /// bpftool's attach type.
    fn tcx(self) -> &'static str {
        match self {
            Hook::Ingress => "tcx_ingress",
            Hook::Egress => "tcx_egress",
        }
    }

    /// `tc filter`'s direction, and `bpftool -j net show`'s `kind` is `tcx/<this>`.
    fn clsact(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

/// The programs at tcx `hook` of `ifname`: (id, name), in order.
fn tcx_programs(
    netns: Option<&str>,
    ifname: &str,
    hook: Hook,
) -> Result<Vec<(u64, String)>, KernelError> {
    let out = bpftool(netns, &["-j", "net", "show", "dev", ifname])?;
    parse_tcx_programs(&out, ifname, hook).map_err(|detail| KernelError::Output {
        command: format!("bpftool -j net show dev {ifname}"),
        detail,
    })
}

/// Parses `bpftool -j net show dev IF` (`[{"tc": [{"devname", "kind": "tcx/ingress",
/// "name", "prog_id"}, …], …}]`).
fn parse_tcx_programs(out: &str, ifname: &str, hook: Hook) -> Result<Vec<(u64, String)>, String> {
    let v: serde_json::Value = serde_json::from_str(out).map_err(|e| e.to_string())?;
    let kind = format!("tcx/{}", hook.clsact());
    let tc = v
        .get(0)
        .and_then(|x| x.get("tc"))
        .and_then(|x| x.as_array())
        .ok_or("no tc list")?;
    tc.iter()
        .filter(|e| {
            e.get("kind").and_then(|k| k.as_str()) == Some(&kind)
                && e.get("devname").and_then(|d| d.as_str()) == Some(ifname)
        })
        .map(|e| {
            let id = e
                .get("prog_id")
                .and_then(|i| i.as_u64())
                .ok_or("a tcx entry without prog_id")?;
            let name = e.get("name").and_then(|n| n.as_str()).unwrap_or("");
            Ok((id, name.to_owned()))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for b in bytes {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// bpftool's raw byte arrays (`["0x02", "0x00", …]`).
fn bytes_of(v: &serde_json::Value) -> Option<Vec<u8>> {
    v.as_array()?
        .iter()
        .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

fn mac_key(m: MacAddr) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..6].copy_from_slice(&m.0);
    k
}

/// One `bpftool -j map dump` entry: its key and its per-CPU (or single) values.
struct Entry {
    key: Vec<u8>,
    values: Vec<Vec<u8>>,
}

/// Parses `bpftool -j map dump` output; the error says what was wrong.
fn parse_dump(out: &str) -> Result<Vec<Entry>, String> {
    let v: serde_json::Value = serde_json::from_str(out).map_err(|e| format!("not JSON: {e}"))?;
    let mut entries = Vec::new();
    for e in v.as_array().ok_or("not an array")? {
        let key = e.get("key").and_then(bytes_of).ok_or("key")?;
        // bpftool walks the keys, then looks each one up: an entry deleted in between
        // (a pair aged out meanwhile) comes as `"value": {"error": "…"}`. It is gone.
        if e.get("value").and_then(|v| v.get("error")).is_some() {
            continue;
        }
        let values = match (e.get("value"), e.get("values")) {
            (Some(v), _) => vec![bytes_of(v).ok_or("value")?],
            (None, Some(vs)) => vs
                .as_array()
                .ok_or("values")?
                .iter()
                .map(|c| c.get("value").and_then(bytes_of))
                .collect::<Option<Vec<_>>>()
                .ok_or("per-CPU value")?,
            (None, None) => return Err("entry without a value".into()),
        };
        entries.push(Entry { key, values });
    }
    Ok(entries)
}

/// The counts in dumps of the `counters` and `pairs` maps (CPUs summed). Rows and pairs
/// that are not the classifier's (short keys, unknown rows or classes) are skipped.
fn decode_counts(counter_rows: &[Entry], pair_rows: &[Entry]) -> KernelCounts {
    let mut rows = [Counter::default(); 8];
    for e in counter_rows {
        let row = usize::try_from(u32_at(&e.key, 0)).unwrap_or(usize::MAX);
        if let Some(r) = rows.get_mut(row) {
            for v in &e.values {
                r.add(Counter {
                    packets: u64_at(v, 0),
                    bytes: u64_at(v, 8),
                });
            }
        }
    }
    let mut counters = ClassCounters::default();
    for (i, class) in TrafficClass::ALL.into_iter().enumerate() {
        *counters.class_mut(class) = rows[i];
    }
    let row = |r: u32| rows[usize::try_from(r).unwrap_or(0)];
    counters.flood = row(ROW_FLOOD);
    counters.neighbor = row(ROW_NEIGHBOR);
    counters.errors = row(ROW_ERRORS).packets;
    let mut flows = Vec::new();
    for e in pair_rows {
        let (Some(src), Some(dst)) = (
            MacAddr::from_slice(e.key.get(..6).unwrap_or_default()),
            MacAddr::from_slice(e.key.get(6..12).unwrap_or_default()),
        ) else {
            continue;
        };
        // Each CPU keeps the class it last computed, with the address-table generation
        // it computed it under: the newest generation's is the pair's class now.
        let mut counter = Counter::default();
        let mut class: Option<(u32, TrafficClass)> = None;
        let mut round = 0;
        for v in &e.values {
            round = round.max(u32_at(v, 24));
            let c = Counter {
                packets: u64_at(v, 0),
                bytes: u64_at(v, 8),
            };
            let gen = u32_at(v, 20);
            let this = u8::try_from(u32_at(v, 16))
                .ok()
                .and_then(|code| TrafficClass::from_code(code.checked_add(1)?));
            if let (false, Some(k)) = (c.is_zero(), this) {
                if class.is_none_or(|(g, _)| gen > g) {
                    class = Some((gen, k));
                }
            }
            counter.add(c);
        }
        if let Some((_, class)) = class {
            flows.push(FlowRecord {
                src,
                dst,
                class,
                // The ageing round it was created in (see `age_pairs`): 1 for one never
                // aged (and for instances loaded before pairs were aged).
                flow_seq: u64::from(round) + 1,
                counter,
            });
        }
    }
    KernelCounts {
        counters,
        flows,
        pairs_full: row(ROW_PAIRS_FULL),
    }
}

/// [`KernelDatapath::read`] on outputs of `bpftool -j map dump` of the `counters` and
/// `pairs` maps: what the fuzz target and tests feed it. A malformed dump is an error
/// naming what was wrong; counts never panic (they saturate).
pub fn counts_from_bpftool(counters: &str, pairs: &str) -> Result<KernelCounts, KernelError> {
    let parse = |map: &str, out: &str| {
        parse_dump(out).map_err(|detail| KernelError::Output {
            command: format!("bpftool -j map dump ({map})"),
            detail,
        })
    };
    Ok(decode_counts(
        &parse("counters", counters)?,
        &parse("pairs", pairs)?,
    ))
}

/// What the classifier counted since its instance was loaded (its epoch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// Per class, flood, neighbour discovery, malformed.
    pub counters: ClassCounters,
    /// Per VM pair (`flow_seq`: 1 + the ageing round the map entry was created in).
    pub flows: Vec<FlowRecord>,
    /// Classified frames whose pair did not fit the full pair map (counted in their class).
    pub pairs_full: Counter,
}

/// Where the `addrs` map says a MAC is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrLocation {
    /// A VM on this host.
    Local,
    /// A VM on another host of the domain.
    Remote,
}

/// One host's loaded classifier: pinned programs and maps.
#[derive(Clone, Debug)]
pub struct KernelDatapath {
    dir: PathBuf,
}

impl KernelDatapath {
    /// Opens instance `name` under [`BPF_ROOT`], loading it when it is not there.
    pub fn open(name: &str) -> Result<KernelDatapath, KernelError> {
        KernelDatapath::open_in(Path::new(BPF_ROOT), name)
    }

    /// Opens instance `name` under `root` (mounting a bpffs there if needed), loading it when
    /// its pins are missing; an instance already loaded keeps its counters and epoch.
    pub fn open_in(root: &Path, name: &str) -> Result<KernelDatapath, KernelError> {
        if name.is_empty()
            || name.starts_with('.')
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(KernelError::Name(name.to_owned()));
        }
        ensure_bpffs(root)?;
        let dp = KernelDatapath {
            dir: root.join(name),
        };
        let loaded = ["progs/vinfra_ingress", "progs/vinfra_egress", "maps/meta"]
            .iter()
            .all(|p| dp.dir.join(p).exists());
        if !loaded {
            dp.load()?;
        } else if NEW_MAPS
            .iter()
            .any(|m| !dp.dir.join("maps").join(m).exists())
        {
            dp.upgrade()?;
        }
        if dp.epoch()? == 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            dp.update("meta", &META_EPOCH.to_le_bytes(), &now.to_le_bytes())?;
        }
        // A new process cannot know what an earlier one left in `addrs`: pairs reclassify.
        dp.bump_generation()?;
        Ok(dp)
    }

    fn load(&self) -> Result<(), KernelError> {
        if self.dir.exists() {
            // A load interrupted half-way: start over.
            std::fs::remove_dir_all(&self.dir)
                .map_err(io(format!("remove {}", self.dir.display())))?;
        }
        std::fs::create_dir_all(&self.dir).map_err(io(format!("create {}", self.dir.display())))?;
        self.load_into(&self.dir, &[])
    }

    /// Replaces the programs of an instance an older vinfra loaded with the current ones,
    /// keeping its counters, address table and epoch: the new programs are loaded on the old
    /// maps (`bpftool prog loadall … map name M pinned …`) into `next/`, whose pins then take
    /// the old ones' places. The NICs keep running the old programs until the agent attaches
    /// them again (it does for every VM it adopts), which replaces them at the hooks. An
    /// upgrade interrupted half-way leaves progs or maps missing: the next open loads afresh,
    /// with a new epoch, as after a reboot.
    fn upgrade(&self) -> Result<(), KernelError> {
        let next = self.dir.join("next");
        if next.exists() {
            std::fs::remove_dir_all(&next).map_err(io(format!("remove {}", next.display())))?;
        }
        std::fs::create_dir_all(&next).map_err(io(format!("create {}", next.display())))?;
        let kept: Vec<(&str, String)> = KEPT_MAPS.iter().map(|m| (*m, self.map(m))).collect();
        self.load_into(&next, &kept)?;
        for d in ["progs", "maps"] {
            let (old, new) = (self.dir.join(d), next.join(d));
            std::fs::remove_dir_all(&old).map_err(io(format!("remove {}", old.display())))?;
            std::fs::rename(&new, &old).map_err(io(format!("rename {}", new.display())))?;
        }
        std::fs::remove_dir(&next).map_err(io(format!("remove {}", next.display())))?;
        tracing::info!(dir = %self.dir.display(), "classifier upgraded, counters kept");
        Ok(())
    }

    /// `bpftool prog loadall` of the classifier, pinning under `dir`/{progs,maps}, with the
    /// maps of `reuse` (name, pinned path) instead of new ones.
    fn load_into(&self, dir: &Path, reuse: &[(&str, String)]) -> Result<(), KernelError> {
        let obj = std::env::temp_dir().join(format!(
            "vinfra-classifier-{}-{}.o",
            std::process::id(),
            self.dir
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ));
        std::fs::write(&obj, CLASSIFIER_OBJECT).map_err(io(format!("write {}", obj.display())))?;
        let (obj_s, progs, maps) = (
            obj.to_string_lossy().into_owned(),
            dir.join("progs").to_string_lossy().into_owned(),
            dir.join("maps").to_string_lossy().into_owned(),
        );
        let mut args = vec!["prog", "loadall", &obj_s, &progs, "type", "classifier"];
        for (name, path) in reuse {
            args.extend(["map", "name", name, "pinned", path]);
        }
        args.extend(["pinmaps", &maps]);
        let res = run("bpftool", &args, None);
        let _ = std::fs::remove_file(&obj);
        res.map(|_| ())
    }

    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).to_string_lossy().into_owned()
    }

    fn map(&self, name: &str) -> String {
        self.path(&format!("maps/{name}"))
    }

    /// The pin directory of this instance.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The counter epoch: unix ns when the instance was loaded.
    pub fn epoch(&self) -> Result<u64, KernelError> {
        self.meta(META_EPOCH)
    }

    /// Whether the classifier forwards frames between the host's VMs on one bridge itself
    /// (the default) or leaves every frame to the bridge (`bridge_only`): for an operator
    /// whose own filters (nftables' bridge family, `br_netfilter`) must see that traffic,
    /// since a frame that skips the bridge skips its netfilter hooks too.
    pub fn set_bridge_only(&self, bridge_only: bool) -> Result<(), KernelError> {
        self.update(
            "meta",
            &META_BRIDGE_ONLY.to_le_bytes(),
            &u64::from(bridge_only).to_le_bytes(),
        )
    }

    fn meta(&self, slot: u32) -> Result<u64, KernelError> {
        let e = self.dump("meta")?;
        Ok(e.iter()
            .find(|e| e.key == slot.to_le_bytes())
            .and_then(|e| e.values.first())
            .map_or(0, |v| u64_at(v, 0)))
    }

    /// Makes every pair's cached class stale (after `addrs` changed). Never 0 (= unset).
    fn bump_generation(&self) -> Result<(), KernelError> {
        let next = match (self.meta(META_GENERATION)? + 1) & 0xffff_ffff {
            0 => 1,
            g => g,
        };
        self.update("meta", &META_GENERATION.to_le_bytes(), &next.to_le_bytes())
    }

    /// Deletes the map entries of VM pairs that stopped talking, so that the 65 536-entry
    /// pair map holds the pairs of now, not of all time. The caller passes only pairs whose
    /// counts the controller has acknowledged and that have not changed since: their totals
    /// are kept there. The ageing round is bumped first, so an entry a frame re-creates
    /// afterwards carries a larger `flow_seq` and is counted from zero as a new flow.
    ///
    /// A frame of such a pair that arrives between the caller's last read and the delete
    /// (milliseconds, after at least the idle time of silence) is lost from its pair row; its
    /// class row, which is never deleted, still counts it.
    pub fn age_pairs(&self, pairs: &[(MacAddr, MacAddr)]) -> Result<(), KernelError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let round = (self.meta(META_AGEING_ROUND)? + 1) & 0xffff_ffff;
        self.update(
            "meta",
            &META_AGEING_ROUND.to_le_bytes(),
            &round.to_le_bytes(),
        )?;
        let m = self.map("pairs");
        let mut batch = String::new();
        for (src, dst) in pairs {
            let mut key = [0u8; 12];
            key[..6].copy_from_slice(&src.0);
            key[6..].copy_from_slice(&dst.0);
            batch.push_str(&format!("map delete pinned {m} key hex {}\n", hex(&key)));
        }
        run("bpftool", &["batch", "file", "-"], Some(&batch)).map(|_| ())
    }

    fn update(&self, map: &str, key: &[u8], value: &[u8]) -> Result<(), KernelError> {
        let (m, k, v) = (self.map(map), hex(key), hex(value));
        let mut args = vec!["map", "update", "pinned", &m, "key", "hex"];
        args.extend(k.split(' '));
        args.extend(["value", "hex"]);
        args.extend(v.split(' '));
        run("bpftool", &args, None).map(|_| ())
    }

    fn dump(&self, map: &str) -> Result<Vec<Entry>, KernelError> {
        let m = self.map(map);
        let out = run("bpftool", &["-j", "map", "dump", "pinned", &m], None)?;
        parse_dump(&out).map_err(|detail| KernelError::Output {
            command: format!("bpftool -j map dump pinned {m}"),
            detail,
        })
    }

    /// Attaches the classifier at ingress and egress of `ifname` (in `netns`, or this
    /// namespace) and records the NIC's VM MAC; returns the interface index. Idempotent.
    ///
    /// At the kernel's tcx hooks (Linux ≥ 6.6, bpftool ≥ 7.4): a frame then pays for the
    /// program alone. A clsact qdisc with cls_bpf filters, the older way, also makes every
    /// frame of the NIC go through the qdisc layer (`vinfra bench vswitch`'s
    /// `vinfra-clsact` row: 2–6% of the bridge's rate behind tcx); it stays as the fallback
    /// where tcx is missing.
    pub fn attach(
        &self,
        netns: Option<&str>,
        ifname: &str,
        mac: MacAddr,
    ) -> Result<u32, KernelError> {
        let ifindex = self.record_nic(netns, ifname, mac)?;
        let tcx = (|| {
            for hook in Hook::ALL {
                self.attach_tcx(netns, ifname, hook)?;
            }
            Ok::<_, KernelError>(())
        })();
        match tcx {
            Ok(()) => {
                // Filters an older vinfra left at the NIC's clsact qdisc would count
                // every frame a second time.
                let _ = run(
                    "tc",
                    &in_ns(netns, &["qdisc", "del", "dev", ifname, "clsact"]),
                    None,
                );
            }
            Err(e) => {
                tracing::warn!(nic = ifname, error = %e, "tcx attach failed; classifier at a clsact qdisc instead");
                for hook in Hook::ALL {
                    let _ = self.detach_tcx(netns, ifname, hook);
                }
                self.clsact_filters(netns, ifname)?;
            }
        }
        Ok(ifindex)
    }

    /// The program at `hook` of `ifname`, unless it is there already. vinfra owns its VM
    /// NICs' hooks: another instance's classifier found there (a stale pin directory) is
    /// detached, or both would count every frame.
    fn attach_tcx(&self, netns: Option<&str>, ifname: &str, hook: Hook) -> Result<(), KernelError> {
        let ours = self.prog_id(hook.prog())?;
        let attached = tcx_programs(netns, ifname, hook)?;
        if attached.iter().any(|(id, _)| *id == ours) {
            return Ok(());
        }
        let stale = attached
            .iter()
            .filter(|(_, name)| name.starts_with("vinfra_"))
            .count();
        if stale > 0 {
            // bpftool detaches the last program of a hook; clear the hook of all of them.
            for _ in 0..attached.len() {
                self.detach_tcx(netns, ifname, hook)?;
            }
        }
        let p = self.path(&format!("progs/{}", hook.prog()));
        bpftool(
            netns,
            &["net", "attach", hook.tcx(), "pinned", &p, "dev", ifname],
        )
        .map(|_| ())
    }

    /// Detaches the last program at `hook` of `ifname`; `Ok(false)` when there was none.
    fn detach_tcx(
        &self,
        netns: Option<&str>,
        ifname: &str,
        hook: Hook,
    ) -> Result<bool, KernelError> {
        match bpftool(netns, &["net", "detach", hook.tcx(), "dev", ifname]) {
            Ok(_) => Ok(true),
            Err(KernelError::Tool { stderr, .. }) if stderr.contains("No such file") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// [`KernelDatapath::attach`] the way it falls back to where tcx is missing: the
    /// programs as `cls_bpf` filters of a clsact qdisc. Public so that the benchmark
    /// compares both ways and the tests run this one on a kernel with tcx.
    pub fn attach_clsact(
        &self,
        netns: Option<&str>,
        ifname: &str,
        mac: MacAddr,
    ) -> Result<u32, KernelError> {
        let ifindex = self.record_nic(netns, ifname, mac)?;
        self.clsact_filters(netns, ifname)?;
        Ok(ifindex)
    }

    /// Records `ifname`'s VM MAC and bridge before any program runs there: the egress
    /// program counts nothing for a NIC it does not know, and frames skip the bridge only
    /// between NICs of one bridge. Not yet `live`: the first frame the VM sends sets it.
    fn record_nic(
        &self,
        netns: Option<&str>,
        ifname: &str,
        mac: MacAddr,
    ) -> Result<u32, KernelError> {
        let (ifindex, bridge) = link(netns, ifname)?;
        let mut tap = [0u8; 16];
        tap[..8].copy_from_slice(&mac_key(mac));
        tap[8..12].copy_from_slice(&bridge.unwrap_or(0).to_le_bytes());
        self.update("taps", &ifindex.to_le_bytes(), &tap)?;
        self.update("fwd", &mac_key(mac), &ifindex.to_le_bytes())?;
        Ok(ifindex)
    }

    fn clsact_filters(&self, netns: Option<&str>, ifname: &str) -> Result<(), KernelError> {
        run(
            "tc",
            &in_ns(netns, &["qdisc", "replace", "dev", ifname, "clsact"]),
            None,
        )?;
        for hook in Hook::ALL {
            let p = self.path(&format!("progs/{}", hook.prog()));
            run(
                "tc",
                &in_ns(
                    netns,
                    &[
                        "filter",
                        "replace",
                        "dev",
                        ifname,
                        hook.clsact(),
                        "pref",
                        "1",
                        "handle",
                        "1",
                        "bpf",
                        "direct-action",
                        "object-pinned",
                        &p,
                    ],
                ),
                None,
            )?;
        }
        Ok(())
    }

    /// Detaches the classifier from `ifname` (when it still exists) and forgets NIC
    /// `ifindex` of VM `mac`: first that frames may skip the bridge to it.
    pub fn detach(
        &self,
        netns: Option<&str>,
        ifname: &str,
        ifindex: u32,
        mac: MacAddr,
    ) -> Result<(), KernelError> {
        // The MAC may be on a newer NIC already (a VM restarted on a new tap).
        if self
            .lookup("fwd", &mac_key(mac))?
            .is_some_and(|v| u32_at(&v, 0) == ifindex)
        {
            self.delete("fwd", &mac_key(mac))?;
        }
        self.delete("taps", &ifindex.to_le_bytes())?;
        // The device may be gone already (its hooks went with it).
        for hook in Hook::ALL {
            if let Ok(attached) = tcx_programs(netns, ifname, hook) {
                for _ in 0..attached.len() {
                    if !matches!(self.detach_tcx(netns, ifname, hook), Ok(true)) {
                        break;
                    }
                }
            }
        }
        let _ = run(
            "tc",
            &in_ns(netns, &["qdisc", "del", "dev", ifname, "clsact"]),
            None,
        );
        Ok(())
    }

    /// Deletes `key` from `map`; a key that is not there is no error.
    fn delete(&self, map: &str, key: &[u8]) -> Result<(), KernelError> {
        let (m, k) = (self.map(map), hex(key));
        let mut args = vec!["map", "delete", "pinned", &m, "key", "hex"];
        args.extend(k.split(' '));
        match run("bpftool", &args, None) {
            Ok(_) => Ok(()),
            Err(KernelError::Tool { stderr, .. }) if stderr.contains("No such file") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The value at `key` of `map`, if any.
    fn lookup(&self, map: &str, key: &[u8]) -> Result<Option<Vec<u8>>, KernelError> {
        let (m, k) = (self.map(map), hex(key));
        let mut args = vec!["-j", "map", "lookup", "pinned", &m, "key", "hex"];
        args.extend(k.split(' '));
        let out = match run("bpftool", &args, None) {
            Ok(out) => out,
            // bpftool -j prints `null` for a key that is not there (exit 254).
            Err(KernelError::Tool { stderr, .. })
                if stderr == "null" || stderr.contains("Not found") =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let v: Option<serde_json::Value> = serde_json::from_str(&out).ok();
        v.as_ref()
            .and_then(|v| v.get("value"))
            .and_then(bytes_of)
            .map(Some)
            .ok_or_else(|| KernelError::Output {
                command: format!("bpftool -j map lookup pinned {m}"),
                detail: "no value".to_owned(),
            })
    }

    /// Makes the `addrs` map exactly `want` (MAC → where it is).
    pub fn set_addresses(&self, want: &BTreeMap<MacAddr, AddrLocation>) -> Result<(), KernelError> {
        let have = self.dump("addrs")?;
        let m = self.map("addrs");
        let mut batch = String::new();
        let want_keys: BTreeMap<[u8; 8], u32> = want
            .iter()
            .map(|(mac, loc)| {
                let v = match loc {
                    AddrLocation::Local => ADDR_LOCAL,
                    AddrLocation::Remote => ADDR_REMOTE,
                };
                (mac_key(*mac), v)
            })
            .collect();
        let mut current = BTreeMap::new();
        for e in &have {
            let v = e.values.first().map_or(0, |v| u32_at(v, 0));
            current.insert(e.key.clone(), v);
            if !want_keys.keys().any(|k| k[..] == e.key[..]) {
                batch.push_str(&format!("map delete pinned {m} key hex {}\n", hex(&e.key)));
            }
        }
        for (k, v) in &want_keys {
            if current.get(&k[..]) != Some(v) {
                batch.push_str(&format!(
                    "map update pinned {m} key hex {} value hex {}\n",
                    hex(k),
                    hex(&v.to_le_bytes())
                ));
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        run("bpftool", &["batch", "file", "-"], Some(&batch))?;
        self.bump_generation()
    }

    /// Reads every counter (summing the CPUs).
    pub fn read(&self) -> Result<KernelCounts, KernelError> {
        Ok(decode_counts(&self.dump("counters")?, &self.dump("pairs")?))
    }

    /// The classifier programs' cumulative kernel run time (ns) and run count, as the
    /// kernel keeps them while `kernel.bpf_stats_enabled` is 1.
    pub fn run_stats(&self) -> Result<(u64, u64), KernelError> {
        let (mut ns, mut cnt) = (0, 0);
        for hook in Hook::ALL {
            let v = self.prog_show(hook.prog())?;
            ns += v.get("run_time_ns").and_then(|x| x.as_u64()).unwrap_or(0);
            cnt += v.get("run_cnt").and_then(|x| x.as_u64()).unwrap_or(0);
        }
        Ok((ns, cnt))
    }

    /// The kernel's id of the pinned program `prog`.
    fn prog_id(&self, prog: &str) -> Result<u64, KernelError> {
        let p = self.path(&format!("progs/{prog}"));
        self.prog_show(prog)?
            .get("id")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| KernelError::Output {
                command: format!("bpftool -j prog show pinned {p}"),
                detail: "no id".to_owned(),
            })
    }

    fn prog_show(&self, prog: &str) -> Result<serde_json::Value, KernelError> {
        let p = self.path(&format!("progs/{prog}"));
        let out = run("bpftool", &["-j", "prog", "show", "pinned", &p], None)?;
        serde_json::from_str(&out).map_err(|e| KernelError::Output {
            command: format!("bpftool -j prog show pinned {p}"),
            detail: e.to_string(),
        })
    }

    /// Unpins the instance: its counters go once no NIC uses the programs any more.
    pub fn remove(self) -> Result<(), KernelError> {
        std::fs::remove_dir_all(&self.dir).map_err(|source| KernelError::Io {
            what: format!("remove {}", self.dir.display()),
            source,
        })
    }
}

/// The interface index of `ifname` in `netns` (or this namespace).
pub fn ifindex(netns: Option<&str>, ifname: &str) -> Result<u32, KernelError> {
    Ok(show_link(netns, ifname)?.0)
}

/// The interface index of `ifname` in `netns` (or this namespace), and its bridge's (the
/// device it is a port of), if any.
fn link(netns: Option<&str>, ifname: &str) -> Result<(u32, Option<u32>), KernelError> {
    let (index, master) = show_link(netns, ifname)?;
    let bridge = match master {
        Some(m) => Some(show_link(netns, &m)?.0),
        None => None,
    };
    Ok((index, bridge))
}

/// `ip -j link show dev DEV`: its index and the name of its master, if any.
fn show_link(netns: Option<&str>, dev: &str) -> Result<(u32, Option<String>), KernelError> {
    let out = run(
        "ip",
        &in_ns(netns, &["-j", "link", "show", "dev", dev]),
        None,
    )?;
    parse_link(&out).map_err(|detail| KernelError::Output {
        command: format!("ip -j link show dev {dev}"),
        detail,
    })
}

/// Parses `ip -j link show dev X` (`[{"ifindex": N, "master": "br0", …}]`).
fn parse_link(out: &str) -> Result<(u32, Option<String>), String> {
    let v: serde_json::Value = serde_json::from_str(out).map_err(|e| e.to_string())?;
    let l = v.get(0).ok_or("no link")?;
    let index = l
        .get("ifindex")
        .and_then(|i| i.as_u64())
        .and_then(|i| u32::try_from(i).ok())
        .ok_or("no ifindex")?;
    Ok((
        index,
        l.get("master").and_then(|m| m.as_str()).map(str::to_owned),
    ))
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> KernelError {
    move |source| KernelError::Io { what, source }
}

fn ensure_bpffs(root: &Path) -> Result<(), KernelError> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").map_err(|source| KernelError::Io {
            what: "read /proc/self/mounts".to_owned(),
            source,
        })?;
    let r = root.to_string_lossy();
    if mounts.lines().any(|l| {
        let mut f = l.split(' ');
        let (_, at, fs) = (f.next(), f.next(), f.next());
        at == Some(&*r) && fs == Some("bpf")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(|source| KernelError::Io {
        what: format!("create {r}"),
        source,
    })?;
    run("mount", &["-t", "bpf", "bpf", &r], None).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le(n: u64, len: usize) -> String {
        n.to_le_bytes()[..len]
            .iter()
            .map(|b| format!("\"0x{b:02x}\""))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// What `bpftool -j map dump` prints for the per-CPU maps (two CPUs).
    fn counters_dump() -> String {
        format!(
            r#"[{{"key":[{}],"values":[{{"cpu":0,"value":[{},{}]}},{{"cpu":1,"value":[{},{}]}}]}},
               {{"key":[{}],"values":[{{"cpu":0,"value":[{},{}]}}]}}]"#,
            le(1, 4),
            le(3, 8),
            le(300, 8),
            le(2, 8),
            le(200, 8),
            le(u64::from(ROW_NEIGHBOR), 4),
            le(4, 8),
            le(168, 8)
        )
    }

    fn pair_value(packets: u64, row: u32, gen: u32) -> String {
        format!(
            "[{},{},{},{}]",
            le(packets, 8),
            le(packets * 98, 8),
            le(u64::from(row), 4),
            le(u64::from(gen), 4)
        )
    }

    #[test]
    fn bpftool_dumps_decode_to_counts_with_the_newest_class() {
        let mac = |n: u8| format!("\"0x02\",\"0x00\",\"0x00\",\"0x00\",\"0x00\",\"0x{n:02x}\"");
        let pairs = format!(
            r#"[{{"key":[{},{}],"values":[{{"cpu":0,"value":{}}},{{"cpu":1,"value":{}}}]}}]"#,
            mac(1),
            mac(2),
            pair_value(2, 1, 3),
            pair_value(5, 0, 4)
        );
        let c = counts_from_bpftool(&counters_dump(), &pairs).expect("decodes");
        assert_eq!(
            c.counters.class(TrafficClass::InterServer),
            Counter {
                packets: 5,
                bytes: 500
            }
        );
        assert_eq!(c.counters.neighbor.packets, 4);
        assert_eq!(c.flows.len(), 1);
        // CPU 1 computed its class under the newer address table: intra-server (row 0).
        assert_eq!(c.flows[0].class, TrafficClass::IntraServer);
        assert_eq!(c.flows[0].counter.packets, 7);
    }

    /// An entry deleted between bpftool's key walk and its lookup is skipped, not an
    /// error (seen in CI: a pair aged out while another reader dumped the map).
    #[test]
    fn an_entry_gone_before_its_lookup_is_skipped() {
        let pairs = r#"[{"key":["0x01"],"value":{"error":"No such file or directory"}}]"#;
        let c = counts_from_bpftool("[]", pairs).expect("a vanished entry is no error");
        assert!(c.flows.is_empty());
        let counters = r#"[{"key":["0x00","0x00","0x00","0x00"],"value":{"error":"gone"}},
            {"key":["0x01","0x00","0x00","0x00"],"value":["0x02","0x00","0x00","0x00","0x00","0x00","0x00","0x00","0x40","0x00","0x00","0x00","0x00","0x00","0x00","0x00"]}]"#;
        let c = counts_from_bpftool(counters, "[]").expect("the other entry is read");
        // Row 1 is inter-server, row 0 (intra-server) vanished.
        assert_eq!(c.counters.classes[1].packets, 2);
        assert_eq!(c.counters.classes[1].bytes, 64);
        assert_eq!(c.counters.classes[0].packets, 0);
    }

    #[test]
    fn malformed_dumps_are_errors_naming_what_is_wrong() {
        for (bad, want) in [
            ("", "not JSON"),
            ("{}", "not an array"),
            (r#"[{"value":[]}]"#, "key"),
            (r#"[{"key":["0x01"]}]"#, "entry without a value"),
            (r#"[{"key":["0x01"],"value":["zz"]}]"#, "value"),
            (
                r#"[{"key":["0x01"],"values":[{"cpu":0}]}]"#,
                "per-CPU value",
            ),
        ] {
            let e = counts_from_bpftool(bad, "[]").expect_err(bad).to_string();
            assert!(e.contains(want) && e.contains("counters"), "{bad}: {e}");
        }
        // Short keys and values and unknown rows are skipped, not a panic.
        let odd = r#"[{"key":["0x01"],"value":["0x01"]},{"key":["0xff","0xff","0xff","0xff"],"value":[]}]"#;
        let c = counts_from_bpftool(odd, odd).expect("decodes");
        assert!(c.flows.is_empty());
    }

    #[test]
    fn a_link_and_its_bridge_are_read_from_ip() {
        let port =
            r#"[{"ifindex":7,"ifname":"tapx","flags":["UP"],"master":"br0","operstate":"UP"}]"#;
        assert_eq!(parse_link(port), Ok((7, Some("br0".to_owned()))));
        assert_eq!(
            parse_link(r#"[{"ifindex":3,"ifname":"lo"}]"#),
            Ok((3, None))
        );
        for bad in [
            "",
            "[]",
            r#"[{"ifname":"x"}]"#,
            r#"[{"ifindex":-1}]"#,
            r#"[{"ifindex":4294967296}]"#,
        ] {
            assert!(parse_link(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tcx_programs_of_one_hook_and_nic_are_read_from_bpftool() {
        let out = r#"[{"xdp":[],"tc":[
            {"devname":"t1","ifindex":3,"kind":"tcx/ingress","name":"vinfra_ingress","prog_id":120},
            {"devname":"t1","ifindex":3,"kind":"tcx/egress","name":"vinfra_egress","prog_id":121},
            {"devname":"t1","ifindex":3,"kind":"tcx/ingress","name":"other","prog_id":7},
            {"devname":"t1","ifindex":3,"kind":"clsact/ingress","name":"old","prog_id":9}
        ],"flow_dissector":[],"netfilter":[]}]"#;
        assert_eq!(
            parse_tcx_programs(out, "t1", Hook::Ingress).expect("parses"),
            vec![(120, "vinfra_ingress".to_owned()), (7, "other".to_owned())]
        );
        assert_eq!(
            parse_tcx_programs(out, "t1", Hook::Egress).expect("parses"),
            vec![(121, "vinfra_egress".to_owned())]
        );
        let none = r#"[{"xdp":[],"tc":[],"flow_dissector":[],"netfilter":[]}]"#;
        assert!(parse_tcx_programs(none, "t1", Hook::Ingress)
            .expect("parses")
            .is_empty());
        for bad in [
            "",
            "{}",
            r#"[{"tc":[{"kind":"tcx/ingress","devname":"t1"}]}]"#,
        ] {
            assert!(
                parse_tcx_programs(bad, "t1", Hook::Ingress).is_err(),
                "{bad}"
            );
        }
    }
}
