//! Elections on a real etcd where the leader's lease stops being renewed:
//! the leader is cut off by a silent network (a proxy that stops forwarding),
//! or its lease is revoked behind its back. The leader must notice within the
//! ttl, before a successor starts, and the successor must take over soon after.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use store::{Leadership, Store, StoreError, TxnOp};
use store_etcd::EtcdStore;
use test_utils::EtcdFixture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const TTL: Duration = Duration::from_secs(2);
/// Slack for the test's own wait (a loaded CI machine wakes tasks late).
const TIMER_SLACK: Duration = Duration::from_millis(500);
/// Slack for the takeover beyond the ttl: etcd checks for expired leases
/// every 500 ms, then the delete reaches the waiting candidate's watch and
/// it runs one Txn.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(2);

/// A TCP proxy that can go silent: after [`Blackhole::cut`] it forwards
/// nothing more but keeps every connection open, like a network partition
/// (no RST, no FIN; the client only notices through timeouts).
struct Blackhole {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

impl Blackhole {
    async fn start(upstream: SocketAddr) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (down_r, down_w) = down.into_split();
                    let (up_r, up_w) = up.into_split();
                    tokio::join!(
                        pipe(down_r, up_w, cut_rx.clone()),
                        pipe(up_r, down_w, cut_rx)
                    );
                });
            }
        });
        Blackhole { addr, cut }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut cut: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            // Mapped to `()`: the watch guard must not live across the await below.
            () = async { let _ = cut.wait_for(|cut| *cut).await; } => {
                // Silent from now on; `from` and `to` stay open until the
                // runtime ends.
                std::future::pending::<()>().await;
            }
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}

fn spawn_campaign(
    store: &Arc<dyn Store>,
    candidate: &'static str,
) -> JoinHandle<Result<Leadership, StoreError>> {
    let store = store.clone();
    tokio::spawn(async move { store.campaign("driver", candidate, TTL).await })
}

/// Asserts that a fenced write of the deposed leader fails.
async fn fenced_write_fails(store: &dyn Store, deposed: &Leadership) {
    let put = TxnOp::Put {
        key: "/ops/1".into(),
        value: Bytes::from("stale"),
    };
    let e = store
        .txn(vec![deposed.fence()], vec![put])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict { key } if key == deposed.key()),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cut_off_leader_loses_within_ttl_and_is_replaced() {
    let etcd = EtcdFixture::spawn().await.unwrap();
    let proxy = Blackhole::start(etcd.client_addr()).await;
    let via_proxy: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(&[proxy.endpoint()], None).await.unwrap());
    let direct: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(&[etcd.endpoint()], None).await.unwrap());

    let leader = via_proxy.campaign("driver", "server-1", TTL).await.unwrap();
    let mut follower = spawn_campaign(&direct, "server-2");

    // Renewals keep the leadership for well over the ttl.
    tokio::time::sleep(TTL * 5 / 2).await;
    assert!(!leader.is_lost(), "lost although renewals got through");
    assert!(
        !follower.is_finished(),
        "the follower took over a live leader"
    );
    assert_eq!(
        direct.leader("driver").await.unwrap().as_deref(),
        Some("server-1")
    );

    proxy.cut();
    let cut = Instant::now();
    let lost = leader.lost();
    let lost_at = tokio::spawn(async move {
        lost.await;
        Instant::now()
    });
    let successor = tokio::time::timeout(TTL + TAKEOVER_MARGIN, &mut follower)
        .await
        .expect("the follower takes over within ttl + margin")
        .unwrap()
        .unwrap();
    let took_over_at = Instant::now();
    let lost_at = tokio::time::timeout(TTL + TIMER_SLACK, lost_at)
        .await
        .expect("the cut-off leader notices")
        .unwrap();
    let (lost_after, takeover_after) = (lost_at - cut, took_over_at - cut);
    eprintln!(
        "ttl {TTL:?}: cut-off leader lost its leadership {lost_after:?} after the cut, \
         the follower led {takeover_after:?} after the cut"
    );
    // The promise of `Store::campaign`: a cut-off leader knows within the ttl.
    assert!(lost_after <= TTL, "lost after {lost_after:?}");
    assert!(
        lost_at <= took_over_at,
        "the old leader stopped ({lost_after:?}) only after the new one started ({takeover_after:?})"
    );
    assert!(successor.revision() > leader.revision());
    assert_eq!(
        direct.leader("driver").await.unwrap().as_deref(),
        Some("server-2")
    );
    fenced_write_fails(&*direct, &leader).await;
    successor.resign().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_lease_is_noticed_at_once() {
    let etcd = EtcdFixture::spawn().await.unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(&[etcd.endpoint()], None).await.unwrap());
    let leader = store.campaign("driver", "server-1", TTL).await.unwrap();
    let mut follower = spawn_campaign(&store, "server-2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!follower.is_finished());

    // Someone else (an operator, a bug) revokes the leader's lease.
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let resp = raw.get(leader.key(), None).await.unwrap();
    let lease = resp.kvs().first().expect("the leader key exists").lease();
    assert_ne!(lease, 0, "the leader key is on a lease");
    let revoked = Instant::now();
    raw.lease_revoke(lease).await.unwrap();

    tokio::time::timeout(TTL, leader.lost())
        .await
        .expect("the leader notices the revoke within the ttl");
    let lost_after = revoked.elapsed();
    let successor = tokio::time::timeout(TTL, &mut follower)
        .await
        .expect("the follower takes over")
        .unwrap()
        .unwrap();
    eprintln!(
        "revoked lease: leader lost {lost_after:?}, follower led {:?} after the revoke",
        revoked.elapsed()
    );
    fenced_write_fails(&*store, &leader).await;
    // Resigning the deposed leadership finds its lease gone: not an error.
    leader.resign().await.unwrap();
    assert_eq!(
        store.leader("driver").await.unwrap().as_deref(),
        Some("server-2")
    );
    successor.resign().await.unwrap();
}
