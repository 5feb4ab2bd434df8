//! The push channel's agent end: keeps this host's event stream
//! (`GET /v1/hosts/{name}/events`) open and forwards every event, so that a change of
//! what the host must run reaches it in milliseconds instead of at the next poll.
//!
//! What the receiver can rely on:
//! - the first event of every connection, the first one and each one after a reconnect,
//!   is [`HostEvent::Resync`]: read the assignments whole (changes made while there was no
//!   connection are never replayed);
//! - a line the client cannot read gives a `Resync` too (what it said is unknown);
//! - nothing comes while the stream is down, so the receiver keeps polling as a fallback
//!   (more slowly while events flow, if it likes);
//! - pings are forwarded: they say the connection is alive.
//!
//! Not wired into the reconciler yet: it still polls every second.
//!
//! Tasks: none of its own; [`follow`] is the task, run by whoever owns the receiver, and
//! ends when the receiver is dropped.

use std::time::Duration;

use client::{Client, ClientError, HostEventStream};
use model::api::HostEvent;
use tokio::sync::mpsc;

/// First wait before reconnecting; doubled after each failure up to [`BACKOFF_MAX`], and
/// back to this once a connection delivers its first line.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Follows `host`'s event stream through `client` (which fails over between its
/// servers), forwarding every event to `tx`, reconnecting with exponential backoff, until
/// `tx`'s receiver is dropped. A full `tx` holds the stream back (the server then sends
/// `Resync` once it has fallen too far behind).
pub(crate) async fn follow(client: Client, host: String, tx: mpsc::Sender<HostEvent>) {
    let mut backoff = Backoff::default();
    loop {
        let opened = tokio::select! {
            r = client.host_events(&host) => r,
            () = tx.closed() => return,
        };
        match opened {
            Ok(mut stream) => {
                if !forward(&mut stream, &host, &tx, &mut backoff).await {
                    return;
                }
            }
            // A server that is down or restarting, a host not registered yet: the same
            // wait either way.
            Err(e) => tracing::warn!(
                host,
                error = %model::error_chain(&e),
                "push: cannot open the host's event stream; retrying"
            ),
        }
        let wait = backoff.next_wait();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = tx.closed() => return,
        }
    }
}

/// Forwards one connection's events until it ends; `false` once the receiver is gone.
async fn forward(
    stream: &mut HostEventStream,
    host: &str,
    tx: &mpsc::Sender<HostEvent>,
    backoff: &mut Backoff,
) -> bool {
    let mut first = true;
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            () = tx.closed() => return false,
        };
        let ev = match item {
            Some(Ok(ev)) => ev,
            Some(Err(e @ ClientError::EventLine { .. })) => {
                tracing::warn!(host, error = %model::error_chain(&e), "push: a line of the event stream cannot be read; resync");
                HostEvent::Resync
            }
            Some(Err(e)) => {
                tracing::warn!(host, error = %model::error_chain(&e), "push: the event stream broke; reconnecting");
                return true;
            }
            None => {
                tracing::info!(
                    host,
                    "push: the server ended the event stream; reconnecting"
                );
                return true;
            }
        };
        if first {
            first = false;
            // The server answered: a later break starts from the shortest wait again.
            backoff.reset();
            // The server's first line is `Resync`; should it not be, the receiver still
            // must not trust what it had before this connection.
            if ev != HostEvent::Resync && tx.send(HostEvent::Resync).await.is_err() {
                return false;
            }
        }
        if tx.send(ev).await.is_err() {
            return false;
        }
    }
}

/// Exponential backoff from [`BACKOFF_MIN`] to [`BACKOFF_MAX`].
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    pub(crate) fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use model::api::{CreateToken, RegisterHost};
    use model::{DesiredState, Role};
    use store::Store;

    use super::*;

    #[test]
    fn backoff_doubles_to_five_seconds_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..8)
            .map(|_| u64::try_from(b.next_wait().as_millis()).unwrap())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_wait(), BACKOFF_MIN);
    }

    async fn put<T: serde::Serialize>(store: &dyn Store, key: &str, v: &T) {
        store
            .put(key, serde_json::to_vec(v).unwrap().into())
            .await
            .unwrap();
    }

    /// The next event that is not a ping.
    async fn next(rx: &mut mpsc::Receiver<HostEvent>) -> HostEvent {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an event within 10 s")
                .expect("follow runs");
            if ev != HostEvent::Ping {
                return ev;
            }
        }
    }

    fn name(s: &str) -> model::Name {
        model::validate_name("name", s).unwrap()
    }

    /// Across a server restart (same store, same address), `follow` reconnects and
    /// starts again with `Resync`; it ends when its receiver is dropped.
    #[tokio::test]
    async fn follow_forwards_reconnects_and_resyncs() {
        let store: Arc<dyn Store> = Arc::new(store::testing::MemStore::new());
        let dir = tempfile::tempdir().unwrap();
        let admin = api::bootstrap_admin(store.as_ref(), dir.path())
            .await
            .unwrap()
            .unwrap();
        let config = |listen: &str| api::ServerConfig {
            listen: listen.parse().unwrap(),
            rate_limit: None,
            ..api::ServerConfig::default()
        };
        let server = api::serve(config("127.0.0.1:0"), store.clone())
            .await
            .unwrap();
        let addr = server.addr();
        let base = format!("http://{addr}");
        let token = Client::new(&base, &admin)
            .unwrap()
            .create_token(&CreateToken::new(Role::Agent))
            .await
            .unwrap()
            .token;
        let agent = Client::new(&base, &token).unwrap();
        agent
            .register_host(&RegisterHost {
                name: "h1".into(),
                cpus: 4,
                vcpus: None,
                memory_mib: 4096,
                disk_gib: 10,
                drivers: vec!["sim".into()],
                agent_url: None,
                nbd_addr: None,
                link_addr: None,
                uplink_ip: None,
            })
            .await
            .unwrap();
        // Records written straight into the store: the server's hub sees every write.
        let image = model::Image {
            id: model::ImageId::new_random(),
            tenant: None,
            name: name("img"),
            kernel: None,
            initrd: None,
            disk_template: None,
            cmdline: String::new(),
            disk_mib: 64,
            created_at: 0,
        };
        put(
            store.as_ref(),
            &format!("/vinfra/images/{}", image.id),
            &image,
        )
        .await;
        let mut vm = model::Vm {
            id: model::VmId::new_random(),
            tenant: model::TenantId::new_random(),
            name: name("web"),
            image: image.id,
            vcpus: 1,
            memory_mib: 64,
            host: name("h1"),
            desired: DesiredState::Running,
            observed: model::ObservedState::Pending,
            error: None,
            created_at: 0,
            migration: None,
            redundancy: None,
            nics: Vec::new(),
            kernel_args: None,
            trace: None,
            resource_tables: Vec::new(),
        };
        let key = format!("/vinfra/vms/{}", vm.id);

        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(follow(agent, "h1".into(), tx));
        assert_eq!(next(&mut rx).await, HostEvent::Resync);
        put(store.as_ref(), &key, &vm).await;
        match next(&mut rx).await {
            HostEvent::Assignment { assignment } => assert_eq!(assignment.vm, vm),
            other => panic!("expected the VM's assignment, got {other:?}"),
        }

        server.shutdown().await.unwrap();
        // Down for a while: several connection attempts fail meanwhile.
        tokio::time::sleep(Duration::from_millis(400)).await;
        vm.desired = DesiredState::Stopped;
        put(store.as_ref(), &key, &vm).await;
        let t = Instant::now();
        let again = api::serve(config(&addr.to_string()), store.clone())
            .await
            .unwrap();
        // The change made while it was down is not replayed: the resync says to read.
        assert_eq!(next(&mut rx).await, HostEvent::Resync);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        vm.desired = DesiredState::Running;
        put(store.as_ref(), &key, &vm).await;
        match next(&mut rx).await {
            HostEvent::Assignment { assignment } => {
                assert_eq!(assignment.desired(), DesiredState::Running);
            }
            other => panic!("expected the VM's assignment, got {other:?}"),
        }

        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("follow ends with its receiver")
            .unwrap();
        again.shutdown().await.unwrap();
    }
}
