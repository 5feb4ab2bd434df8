//! `vinfra bench v2x`: N emulated vehicles, half on each of two operators, in the
//! namespace lab. Measures authorization → parameters, link establishment, one-way message
//! latency on the direct path and through both MECs (CAM-sized, 10 Hz per vehicle), losses,
//! revocation → link down, and the interruption when a vehicle changes operator; and, as
//! the baseline in the same run, bare UDP over the same PC5 bridge (no authorization, no
//! integrity protection) between the same address pairs.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::device::{mono_ns, Device, DeviceSpec, Session, PC5_PORT};
use crate::lab::TwoOperators;
use crate::types::{Plmn, V2xSubscription};

/// Bench parameters.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Vehicles (even; half per operator).
    pub vehicles: u32,
    /// Seconds of 10 Hz messages on the direct path.
    pub direct_secs: u64,
    /// Seconds of 10 Hz messages through the MECs.
    pub relay_secs: u64,
    /// Vehicles revoked / moved (each).
    pub lifecycle: u32,
    /// Message size, bytes.
    pub msg_bytes: usize,
    /// MECs keep their state durable (`--state-dir`, a journal synced before each answer),
    /// as an operator runs them; false: in memory only.
    pub durable: bool,
}

impl Default for BenchOptions {
    fn default() -> BenchOptions {
        BenchOptions {
            vehicles: 1000,
            direct_secs: 30,
            relay_secs: 10,
            lifecycle: 50,
            msg_bytes: 350,
            durable: true,
        }
    }
}

/// One measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What.
    pub metric: String,
    /// Samples.
    pub n: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
    /// The target, if it gives one.
    pub target: String,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Vehicles.
    pub vehicles: u32,
    /// Where the MECs kept their state: "durable" or "memory".
    pub state: &'static str,
    /// Rows.
    pub rows: Vec<Row>,
    /// Messages sent / lost on the direct path.
    pub direct_sent: u64,
    /// Lost on the direct path.
    pub direct_lost: u64,
    /// Sent through the MECs.
    pub relay_sent: u64,
    /// Lost through the MECs.
    pub relay_lost: u64,
    /// Vehicles revoked.
    pub revoked: usize,
    /// Messages of revoked vehicles that still arrived (should be 0).
    pub after_revocation_delivered: u64,
    /// Packets the gate dropped meanwhile.
    pub after_revocation_dropped: u64,
    /// Vehicles that changed operator.
    pub moved: usize,
}

fn row(metric: &str, mut ns: Vec<u64>, target: &str) -> Row {
    ns.sort_unstable();
    let q = |p: f64| {
        if ns.is_empty() {
            return 0.0;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((ns.len() as f64 * p).ceil() as usize).clamp(1, ns.len()) - 1;
        #[allow(clippy::cast_precision_loss)]
        let v = ns[i] as f64 / 1e6;
        v
    };
    Row {
        metric: metric.to_owned(),
        n: ns.len(),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: q(1.0),
        target: target.to_owned(),
    }
}

/// A bench failure.
#[derive(Debug, thiserror::Error)]
#[error("v2x bench: {0}")]
pub struct BenchError(pub String);

fn e<E: std::fmt::Display>(x: E) -> BenchError {
    BenchError(x.to_string())
}

fn ns_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Receives for `secs` + a drain: (latencies, count) of valid messages.
async fn receive(s: Arc<Session>, until: Instant) -> (Vec<u64>, u64) {
    let mut lat = Vec::new();
    let mut n = 0;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Some((_, l, _, _)) = s.recv(left).await {
            lat.push(l);
            n += 1;
        }
    }
    (lat, n)
}

/// Runs the bench.
#[allow(clippy::too_many_lines)]
pub async fn run(o: &BenchOptions) -> Result<Report, BenchError> {
    let half = (o.vehicles / 2).max(1);
    let mut lab = TwoOperators::build("v2xb").map_err(e)?;
    let plmns: [Plmn; 2] = ["001-01".parse().map_err(e)?, "002-02".parse().map_err(e)?];
    // Durable state in a directory of the run, removed at the end (kept on failure).
    let state = std::env::temp_dir().join(format!("vinfra-bench-v2x-{}", std::process::id()));
    let dir = |side: usize| o.durable.then(|| state.join(["a", "b"][side]));
    let secret = b"bench roaming secret";
    let mecs = [
        lab.start_mec(0, &plmns, "bench", secret, dir(0))
            .await
            .map_err(e)?,
        lab.start_mec(1, &plmns, "bench", secret, dir(1))
            .await
            .map_err(e)?,
    ];
    let ips = [
        lab.add_devices(0, half).map_err(e)?,
        lab.add_devices(1, half).map_err(e)?,
    ];
    let mut rows = Vec::new();

    // Provision (operator side) and open every vehicle's sockets.
    let mut devs: [Vec<Device>; 2] = [Vec::new(), Vec::new()];
    for side in 0..2 {
        let other = plmns[1 - side].clone();
        for (i, ip) in ips[side].iter().enumerate() {
            let id = format!("car-{side}-{i}");
            let sub: V2xSubscription = serde_json::from_value(serde_json::json!({
                "services": [36], "plmns": [other], "validityS": 3600}))
            .map_err(e)?;
            let tok = mecs[side]
                .mec
                .provision(&id, sub)
                .await
                .map_err(e)?
                .device_token;
            let d = Device::new(DeviceSpec {
                id,
                token: tok,
                plmn: plmns[side].clone(),
                netns: Some(lab.dev_ns[side].clone()),
                pc5: *ip,
                access: Some(TwoOperators::device_access(side)),
                mec: TwoOperators::mec_http(side),
                home: None,
            })
            .await
            .map_err(e)?;
            devs[side].push(d);
        }
    }

    // Authorization → configuration parameters, 16 in flight.
    let sem = Arc::new(Semaphore::new(16));
    let mut lat = Vec::new();
    let mut tasks = Vec::new();
    for d in devs.iter_mut().flat_map(|v| v.drain(..)) {
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            let t = Instant::now();
            let r = d_authorize(d).await;
            r.map(|d| (d, ns_since(t)))
        }));
    }
    for t in tasks {
        let (d, l) = t.await.map_err(e)?.map_err(e)?;
        lat.push(l);
        let side = usize::from(d.spec.plmn != plmns[0]);
        devs[side].push(d);
    }
    rows.push(row("authorization -> parameters", lat, "p99 <= 5 ms"));
    for v in &mut devs {
        v.sort_by_key(|d| d.spec.pc5);
    }

    // Link establishment, pair i of A with pair i of B, 16 pairs in flight.
    let mut lat = Vec::new();
    let mut tasks = Vec::new();
    let bs: Vec<Device> = devs[1].drain(..).collect();
    let as_: Vec<Device> = devs[0].drain(..).collect();
    for (mut a, mut b) in as_.into_iter().zip(bs) {
        let sem = sem.clone();
        let pb = plmns[1].clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            let t = Instant::now();
            let b_ip = b.spec.pc5;
            let resp = tokio::spawn(async move {
                let s = b.respond(Duration::from_secs(10)).await;
                (b, s)
            });
            let sa = a.initiate(b_ip, &pb, 36, Duration::from_secs(10)).await;
            let (b, sb) = resp.await.map_err(e)?;
            let l = ns_since(t);
            Ok::<_, BenchError>((a, b, sa.map_err(e)?, sb.map_err(e)?, l))
        }));
    }
    let mut pairs = Vec::new();
    for t in tasks {
        let (a, b, sa, sb, l) = t.await.map_err(e)??;
        lat.push(l);
        pairs.push((a, b, sa, sb));
    }
    rows.push(row(
        "link establishment (request..accept, both gates)",
        lat,
        "",
    ));

    // Messages at 10 Hz from every vehicle to its peer, direct then relayed.
    let payload = vec![0xC4u8; o.msg_bytes.clamp(64, 1200)];
    let mut devices = Vec::new();
    let mut sessions: Vec<Pair> = Vec::new();
    for (a, b, sa, sb) in pairs {
        devices.push((a, b));
        sessions.push((Arc::new(sa), Arc::new(sb)));
    }
    let (direct_lat, direct_sent, direct_lost) =
        traffic(&sessions, o.direct_secs, &payload, false).await;
    let (relay_lat, relay_sent, relay_lost) =
        traffic(&sessions, o.relay_secs, &payload, true).await;
    let base = baseline(&lab, &ips, o.direct_secs.min(5), &payload).await?;
    rows.push(row(
        "one-way, direct PC5 path (gate + HMAC)",
        direct_lat,
        "p99 <= 3 ms",
    ));
    rows.push(row("  baseline: bare UDP, same bridge and gate", base, ""));
    rows.push(row(
        "one-way, vehicle -> MEC A -> MEC B -> vehicle",
        relay_lat,
        "p99 <= 10 ms",
    ));

    // Revocation -> link down (both directions closed, the peer MEC told) for the first K
    // vehicles of A; then each sends once more: the gate drops it.
    let k = usize::try_from(o.lifecycle)
        .unwrap_or(0)
        .min(sessions.len() / 2);
    let dropped_before = lab.gate().counters().await.map_err(e)?.dropped_packets;
    // A VIS subscriber of PC5 provisioning changes (WebSocket channel) at B's MEC: it hears
    // of each revocation through the peer release.
    let vis = &mecs[1].mec.vis;
    let (_, created, _) = vis
        .subscribe(
            serde_json::json!({"subscriptionType": "ProvChgPc5Subscription",
            "websockNotifConfig": {"requestWebsocketUri": true},
            "filterCriteria": {"locationInfo": vis.location(),
                               "dstLayer2Id": crate::types::dst_layer2_id(36)}}),
        )
        .await
        .map_err(e)?;
    let sub_id = created["_links"]["self"]["href"]
        .as_str()
        .and_then(|h| h.rsplit('/').next())
        .unwrap_or("")
        .to_owned();
    let (ntx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    vis.attach_ws(&sub_id, ntx)
        .ok_or_else(|| BenchError("no WebSocket subscription".into()))?;
    let mut lat = Vec::new();
    let mut note_lat = Vec::new();
    for i in 0..k {
        let t = Instant::now();
        mecs[0].mec.revoke(&format!("car-0-{i}")).await.map_err(e)?;
        lat.push(ns_since(t));
        if tokio::time::timeout(Duration::from_secs(1), notes.recv())
            .await
            .is_ok()
        {
            note_lat.push(ns_since(t));
        }
    }
    rows.push(row("revocation -> link down (both MECs)", lat, ""));
    rows.push(row(
        "revocation -> peer's VIS subscriber notified",
        note_lat,
        "<= 100 ms",
    ));
    // What the traffic phases left queued is not "after the revocation": drain it first.
    for (_, sb) in sessions.iter().take(k) {
        while sb.recv(Duration::from_millis(2)).await.is_some() {}
    }
    for (sa, _) in sessions.iter().take(k) {
        let _ = sa.send(&payload).await;
    }
    let mut delivered_after = 0u64;
    for (_, sb) in sessions.iter().take(k) {
        if sb.recv(Duration::from_millis(5)).await.is_some() {
            delivered_after += 1;
        }
    }
    let dropped_after = lab.gate().counters().await.map_err(e)?.dropped_packets - dropped_before;

    // Operator change: the next K vehicles of A move to B (provisioned there beforehand, as a
    // roaming profile); interruption = last message received over the old link -> first
    // received over the new one (authorization at B, a new link, its first message).
    let mut lat = Vec::new();
    let mut moved = 0;
    for i in k..(2 * k) {
        let id = format!("car-0-{i}");
        let sub: V2xSubscription = serde_json::from_value(serde_json::json!({
            "services": [36], "plmns": [], "validityS": 3600}))
        .map_err(e)?;
        let tok = mecs[1]
            .mec
            .provision(&id, sub)
            .await
            .map_err(e)?
            .device_token;
        let (sa, sb) = &sessions[i];
        sa.send(&payload).await.map_err(e)?;
        if sb.recv(Duration::from_secs(1)).await.is_none() {
            continue;
        }
        let t_last = Instant::now();
        let (a, b) = &mut devices[i];
        a.detach().await.map_err(e)?;
        a.attach(plmns[1].clone(), TwoOperators::visited_http(0), tok.clone());
        a.authorize().await.map_err(e)?;
        let b_ip = b.spec.pc5;
        let (na, nb) = tokio::join!(
            a.initiate(b_ip, &plmns[1], 36, Duration::from_secs(5)),
            b.respond(Duration::from_secs(5))
        );
        let (na, nb) = (na.map_err(e)?, nb.map_err(e)?);
        na.send(&payload).await.map_err(e)?;
        if nb.recv(Duration::from_secs(1)).await.is_some() {
            lat.push(ns_since(t_last));
            moved += 1;
        }
    }
    rows.push(row(
        "operator change A -> B: interruption",
        lat,
        "<= 50 ms (field: ~120 ms)",
    ));
    drop(sessions);
    drop(devices);
    drop(mecs);
    drop(lab);
    let _ = std::fs::remove_dir_all(&state);
    Ok(Report {
        vehicles: half * 2,
        state: if o.durable { "durable" } else { "memory" },
        rows,
        direct_sent,
        direct_lost,
        relay_sent,
        relay_lost,
        revoked: k,
        after_revocation_delivered: delivered_after,
        after_revocation_dropped: dropped_after,
        moved,
    })
}

async fn d_authorize(mut d: Device) -> Result<Device, crate::device::DeviceError> {
    d.authorize().await?;
    Ok(d)
}

type Pair = (Arc<Session>, Arc<Session>);

/// Both ends of every pair send at 10 Hz for `secs`; returns (latencies, sent, lost).
async fn traffic(pairs: &[Pair], secs: u64, payload: &[u8], relay: bool) -> (Vec<u64>, u64, u64) {
    let stop = Instant::now() + Duration::from_secs(secs);
    let drain = stop + Duration::from_millis(500);
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (a, b) in pairs {
        for (tx, rx) in [(a.clone(), b.clone()), (b.clone(), a.clone())] {
            let p = payload.to_vec();
            senders.push(tokio::spawn(async move {
                // Vehicles are not synchronised: each starts at its own phase of the 100 ms.
                let mut ph = [0u8; 2];
                let _ = getrandom::fill(&mut ph);
                let phase = u64::from(u16::from_le_bytes(ph) % 100);
                tokio::time::sleep(Duration::from_millis(phase)).await;
                let mut t = tokio::time::interval(Duration::from_millis(100));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut sent = 0u64;
                while Instant::now() < stop {
                    t.tick().await;
                    let r = if relay {
                        tx.send_relayed(&p).await
                    } else {
                        tx.send(&p).await
                    };
                    if r.is_ok() {
                        sent += 1;
                    }
                }
                sent
            }));
            receivers.push(tokio::spawn(receive(rx, drain)));
        }
    }
    let mut sent = 0;
    for s in senders {
        sent += s.await.unwrap_or(0);
    }
    let mut lat = Vec::new();
    let mut got = 0;
    for r in receivers {
        if let Ok((l, n)) = r.await {
            lat.extend(l);
            got += n;
        }
    }
    (lat, sent, sent.saturating_sub(got))
}

/// Bare UDP between the same address pairs over the same bridge, the gate open for them
/// (their links are up), at 10 Hz: what the kernel path alone costs.
async fn baseline(
    lab: &TwoOperators,
    ips: &[Vec<Ipv4Addr>; 2],
    secs: u64,
    payload: &[u8],
) -> Result<Vec<u64>, BenchError> {
    let n = ips[0].len().min(100);
    let port = PC5_PORT + 1;
    let mut rx = Vec::new();
    let mut tx = Vec::new();
    for (ia, ib) in ips[0].iter().zip(&ips[1]).take(n) {
        let b = crate::netns::udp(Some(&lab.dev_ns[1]), SocketAddr::new((*ib).into(), port))
            .map_err(e)?;
        let a = crate::netns::udp(Some(&lab.dev_ns[0]), SocketAddr::new((*ia).into(), port))
            .map_err(e)?;
        rx.push(b);
        tx.push((a, *ib));
    }
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut handles = Vec::new();
    for (a, dst) in tx {
        let p = payload.to_vec();
        handles.push(tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(100));
            let mut m = p;
            while Instant::now() < stop {
                t.tick().await;
                m[..8].copy_from_slice(&mono_ns().to_be_bytes());
                let _ = a.send_to(&m, (dst, port)).await;
            }
        }));
    }
    let mut lat_tasks = Vec::new();
    for b in rx {
        lat_tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut buf = [0u8; 2048];
            let drain = stop + Duration::from_millis(300);
            while let Ok(Ok((k, _))) = tokio::time::timeout(
                drain.saturating_duration_since(Instant::now()),
                b.recv_from(&mut buf),
            )
            .await
            {
                if k >= 8 {
                    let mut t = [0u8; 8];
                    t.copy_from_slice(&buf[..8]);
                    lat.push(mono_ns().saturating_sub(u64::from_be_bytes(t)));
                }
            }
            lat
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let mut lat = Vec::new();
    for t in lat_tasks {
        lat.extend(t.await.unwrap_or_default());
    }
    Ok(lat)
}
