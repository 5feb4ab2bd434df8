//! Two operators in network namespaces: a device on A authorizes at A's MEC, establishes a
//! link over the PC5 medium with a device on B (authorized at B's MEC), messages flow
//! directly and through both MECs; the negative and lifecycle cases count packets with the
//! gate's nftables counters. Needs root, `ip` (iproute2) and `nft` (nftables).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use v2x::device::{Device, DeviceSpec};
use v2x::lab::TwoOperators;
use v2x::serve::MecHandle;
use v2x::types::{Plmn, V2xSubscription};

const TOKEN: &str = "operator-token";
const CAM: u64 = 36;
const T: Duration = Duration::from_secs(5);

fn tools() {
    for (bin, install) in [("ip", "iproute2"), ("nft", "nftables")] {
        let ok = std::process::Command::new(bin)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "{bin} is missing: apt-get install {install} (scripts/setup.sh installs it)"
        );
    }
}

fn plmns() -> [Plmn; 2] {
    ["001-01".parse().unwrap(), "002-02".parse().unwrap()]
}

fn sub(plmns: &[&Plmn], validity_s: u32) -> V2xSubscription {
    serde_json::from_value(json!({"services": [CAM], "plmns": plmns, "validityS": validity_s}))
        .unwrap()
}

struct World {
    lab: TwoOperators,
    mecs: [MecHandle; 2],
}

async fn world(prefix: &str) -> World {
    tools();
    let lab = TwoOperators::build(prefix).unwrap();
    let mecs = lab.start_mecs(plmns(), TOKEN, b"roaming").await.unwrap();
    World { lab, mecs }
}

impl World {
    /// A device of `side` with PC5 address `pc5`, provisioned with `s` (None: not at all).
    async fn device(
        &self,
        side: usize,
        id: &str,
        pc5: Ipv4Addr,
        s: Option<V2xSubscription>,
    ) -> Device {
        let token = match s {
            Some(s) => {
                self.mecs[side]
                    .mec
                    .provision(id, s)
                    .await
                    .unwrap()
                    .device_token
            }
            None => "never-provisioned".into(),
        };
        Device::new(DeviceSpec {
            id: id.into(),
            token,
            plmn: plmns()[side].clone(),
            netns: Some(self.lab.dev_ns[side].clone()),
            pc5,
            access: Some(TwoOperators::device_access(side)),
            mec: TwoOperators::mec_http(side),
            home: None,
        })
        .await
        .unwrap()
    }

    async fn dropped(&self) -> u64 {
        self.lab.gate().counters().await.unwrap().dropped_packets
    }

    async fn passed(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Option<u64> {
        self.lab
            .gate()
            .counters()
            .await
            .unwrap()
            .open
            .iter()
            .find(|(a, b, _)| *a == src && *b == dst)
            .map(|x| x.2)
    }
}

#[tokio::test]
async fn cross_operator_link_direct_and_through_both_mecs() {
    let mut w = world("v2xe2e").await;
    let a_ip = w.lab.add_devices(0, 1).unwrap()[0];
    let b_ip = w.lab.add_devices(1, 1).unwrap()[0];
    let [pa, pb] = plmns();
    let mut a = w.device(0, "car-a", a_ip, Some(sub(&[&pb], 600))).await;
    let mut b = w.device(1, "car-b", b_ip, Some(sub(&[&pa], 600))).await;
    let ca = a.authorize().await.unwrap();
    assert_eq!(ca.pc5_authorization.nr, vec![pa.clone(), pb.clone()]);
    assert_eq!(ca.peer_servers[0].plmn, pb);
    b.authorize().await.unwrap();

    let responder = tokio::spawn(async move {
        let s = b.respond(T).await;
        (b, s)
    });
    let sa = a.initiate(b_ip, &pb, CAM, T).await.unwrap();
    let (_b, sb) = responder.await.unwrap();
    let sb = sb.unwrap();
    // Each operator opened its own direction.
    assert_eq!(w.mecs[0].mec.function.links(None).len(), 1);
    assert_eq!(w.mecs[1].mec.function.links(None).len(), 1);

    // CAM-sized messages at 10 Hz, directly over PC5.
    let cam = vec![0x5A; 350];
    for _ in 0..10 {
        sa.send(&cam).await.unwrap();
        let (_, _, len, relayed) = sb.recv(T).await.expect("the CAM arrives");
        assert_eq!((len, relayed), (350, false));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = w.lab.gate().counters().await.unwrap();
    assert!(
        w.passed(a_ip, b_ip).await.unwrap() >= 12,
        "DCR, SMP and 10 CAMs crossed the gate: {c:?}"
    );
    // Through MEC A and MEC B (inter-operator link).
    for _ in 0..5 {
        sa.send_relayed(&cam).await.unwrap();
        let (_, _, len, relayed) = sb.recv(T).await.expect("the relayed CAM arrives");
        assert_eq!((len, relayed), (350, true));
    }
    // A leaves operator A: its path closes there and at B's MEC (the peer release).
    a.detach().await.unwrap();
    assert!(w.mecs[0].mec.function.links(None).is_empty());
    assert!(w.mecs[1].mec.function.links(None).is_empty());
    assert!(w.passed(a_ip, b_ip).await.is_none());
    assert!(w.passed(b_ip, a_ip).await.is_none());
}

#[tokio::test]
async fn unauthorized_devices_get_nothing_across() {
    let mut w = world("v2xneg").await;
    let ips_a = w.lab.add_devices(0, 2).unwrap();
    let b_ip = w.lab.add_devices(1, 1).unwrap()[0];
    let [pa, _pb] = plmns();
    // No subscription at all: refused, and its packets die at the gate.
    let mut nosub = w.device(0, "car-x", ips_a[0], None).await;
    match nosub.authorize().await {
        Err(v2x::device::DeviceError::Refused { status: 404, .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    // B's operator not in the authorized list: the link is refused.
    let mut narrow = w.device(0, "car-y", ips_a[1], Some(sub(&[], 600))).await;
    narrow.authorize().await.unwrap();
    match narrow.open_path(b_ip, &plmns()[1], CAM).await {
        Err(v2x::device::DeviceError::Refused {
            status: 403,
            detail,
        }) => {
            assert!(detail.contains("002-02"), "{detail}")
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let mut b = w.device(1, "car-b", b_ip, Some(sub(&[&pa], 600))).await;
    b.authorize().await.unwrap();
    let before = w.dropped().await;
    // Both try to talk to B over PC5 anyway.
    for d in [&nosub, &narrow] {
        let s = d.pc5_socket();
        for _ in 0..20 {
            s.send_to(&[0u8; 350], (b_ip, v2x::device::PC5_PORT))
                .await
                .unwrap();
        }
    }
    let probe = b.pc5_socket();
    let mut buf = [0u8; 512];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), probe.recv_from(&mut buf))
            .await
            .is_err(),
        "nothing reached B"
    );
    assert_eq!(w.dropped().await - before, 40, "the gate dropped all 40");
    assert!(
        w.lab.gate().counters().await.unwrap().open.is_empty(),
        "no path was opened"
    );
}

#[tokio::test]
async fn revocation_expiry_and_moving_operator() {
    let mut w = world("v2xlife").await;
    let a_ip = w.lab.add_devices(0, 1).unwrap()[0];
    let b_ip = w.lab.add_devices(1, 1).unwrap()[0];
    let [pa, pb] = plmns();
    let mut a = w.device(0, "car-a", a_ip, Some(sub(&[&pb], 600))).await;
    let mut b = w.device(1, "car-b", b_ip, Some(sub(&[&pa], 1))).await;
    a.authorize().await.unwrap();
    b.authorize().await.unwrap();
    // A VIS subscriber of PC5 changes for the CAM destination, attached to B's MEC.
    let vis = &w.mecs[1].mec.vis;
    let (_, created, _) = vis
        .subscribe(json!({"subscriptionType": "ProvChgPc5Subscription",
            "websockNotifConfig": {"requestWebsocketUri": true},
            "filterCriteria": {"locationInfo": vis.location(), "dstLayer2Id": "0xFF0024"}}))
        .await
        .unwrap();
    let id = created["_links"]["self"]["href"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let (tx, mut notes) = mpsc::unbounded_channel();
    vis.attach_ws(&id, tx).unwrap();

    // B's parameters are valid for 1 s: once they run out its side of the link goes (the
    // sweeper), it asks again and gets new ones (the TS 38.523-1 pattern).
    let first = b.params.clone().unwrap();
    let responder = tokio::spawn(async move {
        let s = b.respond(T).await;
        (b, s)
    });
    let sa = a.initiate(b_ip, &pb, CAM, T).await.unwrap();
    let (mut b, sb) = responder.await.unwrap();
    let sb = sb.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w.mecs[1].mec.function.links(Some("car-b")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "B's link outlived its parameters"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The notification goes out once the gate is closed (and the peer told).
    let n: serde_json::Value = serde_json::from_str(&notes.recv().await.unwrap()).unwrap();
    assert_eq!(n["notificationType"], "ProvChgPc5Notification");
    assert!(
        w.passed(b_ip, a_ip).await.is_none(),
        "B's direction is closed"
    );
    let second = b.authorize().await.unwrap();
    assert!(second.expires_at_ms > first.expires_at_ms);
    // The peer's MEC closed its way towards B too when B's parameters ran out; for the rest,
    // B gets longer-lived terms (new terms = new credential) and both paths open again.
    assert!(
        w.passed(a_ip, b_ip).await.is_none(),
        "A's MEC closed the path towards expired B"
    );
    let tok = w.mecs[1]
        .mec
        .provision("car-b", sub(&[&pa], 600))
        .await
        .unwrap()
        .device_token;
    b.attach(pb.clone(), TwoOperators::mec_http(1), tok);
    b.authorize().await.unwrap();
    a.open_path(b_ip, &pb, CAM).await.unwrap();

    // Revocation of A mid-stream: A's path closes, B's MEC closes its path back, subscribers
    // hear of it, and no further message crosses.
    b.open_path(a_ip, &pa, CAM).await.unwrap();
    sa.send(&[1u8; 350]).await.unwrap();
    assert!(sb.recv(T).await.is_some());
    w.mecs[0].mec.revoke("car-a").await.unwrap();
    assert!(
        w.passed(a_ip, b_ip).await.is_none(),
        "A's direction is closed"
    );
    assert!(
        w.passed(b_ip, a_ip).await.is_none(),
        "B's MEC closed the way back"
    );
    let n: serde_json::Value = serde_json::from_str(&notes.recv().await.unwrap()).unwrap();
    assert_eq!(n["dstLayer2Id"], "0xFF0024");
    let before = w.dropped().await;
    for _ in 0..10 {
        sa.send(&[1u8; 350]).await.unwrap();
    }
    assert!(
        sb.recv(Duration::from_millis(300)).await.is_none(),
        "nothing after revocation"
    );
    assert_eq!(w.dropped().await - before, 10);

    // A moves to operator B: provisioned there, it authorizes at B's MEC and links again.
    let tok = w.mecs[1]
        .mec
        .provision("car-a", sub(&[&pb], 600))
        .await
        .unwrap()
        .device_token;
    a.attach(pb.clone(), TwoOperators::visited_http(0), tok);
    a.authorize().await.unwrap();
    let responder = tokio::spawn(async move {
        let s = b.respond(T).await;
        (b, s)
    });
    let sa = a.initiate(b_ip, &pb, CAM, T).await.unwrap();
    let (_b, sb) = responder.await.unwrap();
    let sb = sb.unwrap();
    sa.send(&[2u8; 350]).await.unwrap();
    assert!(
        sb.recv(T).await.is_some(),
        "the link works under operator B"
    );
    assert_eq!(w.mecs[1].mec.function.links(Some("car-a")).len(), 1);
}

/// Starts the MEC of `side` from `dir`, retrying while a stopped one's sockets are still
/// being released.
async fn start_from(lab: &TwoOperators, side: usize, dir: &std::path::Path) -> MecHandle {
    let t0 = Instant::now();
    loop {
        match lab
            .start_mec(side, &plmns(), TOKEN, b"roaming", Some(dir.to_owned()))
            .await
        {
            Ok(h) => return h,
            Err(e) if t0.elapsed() < T && e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the MEC does not start: {e}"),
        }
    }
}

async fn passed(lab: &TwoOperators, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    let c = lab.gate().counters().await.unwrap();
    c.open.iter().any(|(a, b, _)| *a == src && *b == dst)
}

#[tokio::test]
async fn a_restarted_mec_keeps_its_links_and_closes_what_it_had_revoked() {
    tools();
    let lab = TwoOperators::build("v2xrst").unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mecs = [
        start_from(&lab, 0, dirs[0].path()).await,
        start_from(&lab, 1, dirs[1].path()).await,
    ];
    let mut w = World { lab, mecs };
    let a_ip = w.lab.add_devices(0, 1).unwrap()[0];
    let b_ip = w.lab.add_devices(1, 1).unwrap()[0];
    let [pa, pb] = plmns();
    let mut a = w.device(0, "car-a", a_ip, Some(sub(&[&pb], 600))).await;
    let mut b = w.device(1, "car-b", b_ip, Some(sub(&[&pa], 600))).await;
    a.authorize().await.unwrap();
    b.authorize().await.unwrap();
    let responder = tokio::spawn(async move {
        let s = b.respond(T).await;
        (b, s)
    });
    let sa = a.initiate(b_ip, &pb, CAM, T).await.unwrap();
    let (_b, sb) = responder.await.unwrap();
    let sb = sb.unwrap();
    let link = w.mecs[0].mec.function.links(None);
    assert_eq!(link.len(), 1);
    let World {
        lab,
        mecs: [a_mec, _b_mec],
    } = w;

    // A stops and starts again from its state: the device, its authorization and its link
    // are there, the gate kept A's rule and B's, and messages still cross.
    drop(a_mec);
    let a_mec = start_from(&lab, 0, dirs[0].path()).await;
    assert_eq!(a_mec.mec.function.links(None), link);
    assert_eq!(a_mec.mec.function.devices(), vec!["car-a".to_owned()]);
    assert!(a_mec.mec.function.authorization("car-a").is_some());
    assert!(passed(&lab, a_ip, b_ip).await, "A's rule survived");
    assert!(
        passed(&lab, b_ip, a_ip).await,
        "B's rule survived A's restart"
    );
    sa.send(&[7u8; 350]).await.unwrap();
    assert!(
        sb.recv(T).await.is_some(),
        "the link carries messages after the restart"
    );
    // The token handed out before the restart is still the device's credential.
    a.authorize().await.unwrap();

    // A crash between recording a revocation and closing the gate: the journal says
    // revoked, the rule is still in the gate. The next start closes it.
    drop(a_mec);
    let journal = dirs[0].path().join(v2x::function::JOURNAL_FILE);
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&journal)
        .unwrap()
        .write_all(b"{\"op\":\"revoke\",\"device\":\"car-a\"}\n")
        .unwrap();
    assert!(passed(&lab, a_ip, b_ip).await, "the rule is still there");
    let a_mec = start_from(&lab, 0, dirs[0].path()).await;
    assert!(a_mec.mec.function.devices().is_empty());
    assert!(a_mec.mec.function.links(None).is_empty());
    assert!(
        !passed(&lab, a_ip, b_ip).await,
        "the revoked device's rule was closed at start"
    );
    assert!(passed(&lab, b_ip, a_ip).await, "B's rule is B's to close");

    // A journal line that is not a record: the MEC refuses to start, naming file and line.
    drop(a_mec);
    std::fs::write(&journal, "{\"op\":\"provision\"}\n").unwrap();
    let t0 = Instant::now();
    let e = loop {
        match lab
            .start_mec(
                0,
                &plmns(),
                TOKEN,
                b"roaming",
                Some(dirs[0].path().to_owned()),
            )
            .await
        {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && t0.elapsed() < T => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => break e.to_string(),
            Ok(_) => panic!("a corrupt journal was accepted"),
        }
    };
    assert!(
        e.contains("line 1") && e.contains(v2x::function::JOURNAL_FILE),
        "{e}"
    );
}

#[tokio::test]
async fn a_roaming_device_is_authorized_from_its_home_subscription() {
    let mut w = world("v2xroam").await;
    let a_ip = w.lab.add_devices(0, 1).unwrap()[0];
    let b_ip = w.lab.add_devices(1, 1).unwrap()[0];
    let [pa, pb] = plmns();
    // car-a is provisioned at home (A) only; B knows nothing of it.
    let mut a = w.device(0, "car-a", a_ip, Some(sub(&[&pb], 600))).await;
    let mut b = w.device(1, "car-b", b_ip, Some(sub(&[&pa], 600))).await;
    b.authorize().await.unwrap();

    // A stranger claiming A as home with a made-up token gets nothing, and B keeps nothing.
    let x_ip = w.lab.add_devices(1, 1).unwrap()[0];
    let mut liar = w.device(1, "car-x", x_ip, None).await;
    liar.spec.home = Some(pa.clone());
    assert!(
        matches!(
            liar.authorize().await,
            Err(v2x::device::DeviceError::Refused { status: 404, .. })
        ),
        "a token home does not know is refused"
    );
    assert!(!w.mecs[1]
        .mec
        .function
        .devices()
        .contains(&"car-x".to_owned()));

    // car-a roams to B with its home token: B fetches the subscription from A.
    a.roam(pb.clone(), TwoOperators::visited_http(0));
    let p = a.authorize().await.unwrap();
    assert_eq!(p.serving_plmn, pb);
    assert_eq!(
        w.mecs[1].mec.function.subscription("car-a").unwrap(),
        w.mecs[0].mec.function.subscription("car-a").unwrap(),
        "B holds home's terms"
    );
    let responder = tokio::spawn(async move {
        let s = b.respond(T).await;
        (b, s)
    });
    let sa = a.initiate(b_ip, &pb, CAM, T).await.unwrap();
    let (_b, sb) = responder.await.unwrap();
    let sb = sb.unwrap();
    sa.send(&[3u8; 350]).await.unwrap();
    assert!(
        sb.recv(T).await.is_some(),
        "the roaming device's link works"
    );

    // Home revokes: B drops its copy and the link before the revocation is answered.
    w.mecs[0].mec.revoke("car-a").await.unwrap();
    assert!(!w.mecs[1]
        .mec
        .function
        .devices()
        .contains(&"car-a".to_owned()));
    assert!(w.mecs[1].mec.function.links(Some("car-a")).is_empty());
    assert!(
        w.passed(a_ip, b_ip).await.is_none(),
        "its direction is closed"
    );
    assert!(
        matches!(
            a.authorize().await,
            Err(v2x::device::DeviceError::Refused { status: 404, .. })
        ),
        "home no longer vouches for it"
    );
}
