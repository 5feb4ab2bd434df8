//! Resource tables end to end (docs/SHM.md): a real `vinfra server`, a real agent (sim
//! compute driver: the table does not care), devices that are `vinfra resource-table
//! attach` processes using `shm::Device` on the agent's socket. A write under a grant
//! lands and shows in the audit; a store without a grant raises SIGBUS and shows as a
//! refused write; another tenant sees nothing; the contents survive an agent restart.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use model::api::CreateToken;
use model::resource_tables::{ResourceTable, TableAuditKind};
use model::Role;
use test_utils::ChildGuard;

use crate::harness::{cli, path_in, spawn_agent_in, wait_host_up, Server, VINFRA};

/// A device process driven line by line.
struct Device {
    child: ChildGuard,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    id: u32,
}

impl Device {
    fn attach(socket: &str) -> Device {
        Self::try_attach(socket).unwrap_or_else(|| panic!("device did not attach to {socket}"))
    }

    /// A device, or `None` when nothing serves the socket (yet).
    fn try_attach(socket: &str) -> Option<Device> {
        let mut child = Command::new(VINFRA)
            .args(["resource-table", "attach", socket])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn a device");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut d = Device {
            child: ChildGuard::new(child),
            stdin,
            stdout,
            id: 0,
        };
        let ready = d.line();
        d.id = ready.strip_prefix("ready ")?.parse().ok()?;
        Some(d)
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).expect("device output");
        l.trim_end().to_owned()
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").expect("device input");
        self.stdin.flush().unwrap();
        self.line()
    }
}

/// Waits until `f` holds for the table as `c` sees it; returns the table.
async fn table_where(
    c: &client::Client,
    name: &str,
    what: &str,
    f: impl Fn(&ResourceTable) -> bool,
) -> ResourceTable {
    let mut last = None;
    for _ in 0..300 {
        if let Ok(t) = c.get_resource_table("host-a", name).await {
            if f(&t) {
                return t;
            }
            last = Some(t);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within 30 s; last {last:#?}");
}

fn has(
    t: &ResourceTable,
    device: u32,
    entry: u32,
    kind: TableAuditKind,
    reason: Option<&str>,
) -> bool {
    t.state.as_ref().is_some_and(|s| {
        s.audit.iter().any(|a| {
            a.device == device
                && a.entry == Some(entry)
                && a.kind == kind
                && (reason.is_none() || a.reason.as_deref() == reason)
        })
    })
}

#[tokio::test]
async fn a_write_under_a_grant_lands_and_a_stray_store_is_refused_and_audited() {
    let s = Server::start().await;
    let admin = s.admin();
    let agent_token = admin
        .create_token(&CreateToken::new(Role::Agent))
        .await
        .unwrap()
        .token;
    let token_file = path_in(&s, "agent-token");
    std::fs::write(&token_file, &agent_token).unwrap();
    let host_dir = path_in(&s, "h");
    let sim = ["--driver", "sim"];
    let mut agent = spawn_agent_in(&s, "host-a", &host_dir, &token_file, &[], None, &sim);
    wait_host_up(&s, "host-a").await;
    let mut tokens = Vec::new();
    for t in ["acme", "other"] {
        admin.create_tenant(t).await.unwrap();
        tokens.push(
            admin
                .create_token(&CreateToken {
                    tenant: Some(t.into()),
                    ..CreateToken::new(Role::Member)
                })
                .await
                .unwrap()
                .token,
        );
    }
    let (acme, other) = (tokens[0].clone(), tokens[1].clone());

    // Through the CLI, as a user would; a spec out of its limits names the limit, and
    // no token is no table.
    let create = |token: &str, size: &str| {
        cli(
            &s,
            token,
            &[
                "resource-table",
                "create",
                "flows",
                "--host",
                "host-a",
                "--entries",
                "16",
                "--entry-size",
                size,
            ],
        )
    };
    let (ok, out, err) = create(&acme, "12");
    assert!(
        !ok && err.contains("entry_size: must be a multiple of 8, got 12"),
        "{out}{err}"
    );
    let (ok, out, _) = create("", "64");
    assert!(!ok, "created without a token: {out}");
    let (ok, out, err) = create(&acme, "64");
    assert!(ok, "create failed: {out}{err}");
    let (ok, _, err) = create(&acme, "64");
    assert!(!ok && err.contains("already exists"), "{err}");

    let c = s.client(&acme);
    let t = table_where(&c, "flows", "the agent reports the table", |t| {
        t.state
            .as_ref()
            .is_some_and(|s| s.error.is_none() && !s.socket.is_empty())
    })
    .await;
    let socket = t.state.unwrap().socket;
    assert!(
        socket.starts_with(&host_dir.display().to_string()),
        "{socket}"
    );

    let mut a = Device::attach(&socket);
    let mut b = Device::attach(&socket);
    let granted = a.cmd("req 3 5000");
    assert!(granted.starts_with("granted "), "{granted}");
    let written = a.cmd("write 3 hello from a");
    let version: u64 = written
        .strip_prefix("written ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{written}"));
    // B has no grant: the kernel refuses its store, and its request is refused too.
    assert_eq!(b.cmd("store 3 8 42"), "sigbus");
    assert_eq!(b.cmd("req 3"), format!("held {}", a.id));
    assert_eq!(b.cmd("read 3"), format!("read {version} hello from a"));
    assert_eq!(a.cmd("rel 3"), "released");
    // Released: A's store is refused now as well; B may write.
    assert_eq!(a.cmd("store 3 8 7"), "sigbus");
    assert!(b.cmd("req 3 1000").starts_with("granted "));
    let written = b.cmd("write 3 hello from b");
    let version_b: u64 = written
        .strip_prefix("written ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{written}"));
    assert!(version_b > version, "{version_b} after {version}");
    assert_eq!(b.cmd("rel 3"), "released");

    let (ad, bd) = (a.id, b.id);
    let t = table_where(
        &c,
        "flows",
        "the audit shows grant, refusals, release",
        |t| {
            has(t, ad, 3, TableAuditKind::Granted, None)
                && has(t, bd, 3, TableAuditKind::RefusedWrite, None)
                && has(t, bd, 3, TableAuditKind::Refused, None)
                && has(t, ad, 3, TableAuditKind::Revoked, Some("released"))
                && has(t, ad, 3, TableAuditKind::RefusedWrite, None)
                && has(t, bd, 3, TableAuditKind::Revoked, Some("released"))
        },
    )
    .await;
    let st = t.state.as_ref().unwrap();
    assert_eq!(
        (
            st.totals.grants,
            st.totals.refused,
            st.totals.refused_writes
        ),
        (2, 1, 2)
    );
    assert!(st.devices.iter().any(|d| d.id == ad) && st.devices.iter().any(|d| d.id == bd));
    assert!(
        st.versions
            .iter()
            .any(|v| v.entry == 3 && v.version == version_b),
        "{:?}",
        st.versions
    );
    let refused = st
        .audit
        .iter()
        .find(|r| r.kind == TableAuditKind::Refused)
        .unwrap();
    assert_eq!(refused.holder, Some(ad));
    // The CLI shows the same audit.
    let (ok, out, err) = cli(
        &s,
        &acme,
        &["resource-table", "grants", "flows", "--host", "host-a"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("refused_write") && out.contains(&format!("held by device {ad}")),
        "{out}"
    );

    // A device killed while it holds a grant: revoked, `device_gone`.
    assert!(a.cmd("req 5 10000").starts_with("granted "));
    a.child.kill();
    table_where(&c, "flows", "the dead device's grant is revoked", |t| {
        has(t, ad, 5, TableAuditKind::Revoked, Some("device_gone"))
            && t.state.as_ref().is_some_and(|s| s.grants.is_empty())
    })
    .await;

    // Another tenant sees nothing: not in the list, not by name, not by id.
    let o = s.client(&other);
    assert!(o.list_resource_tables("host-a").await.unwrap().is_empty());
    for key in ["flows".to_owned(), t.id.to_string()] {
        let e = o.get_resource_table("host-a", &key).await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{e}");
        let e = o.delete_resource_table("host-a", &key).await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{e}");
    }
    let (ok, _, err) = cli(
        &s,
        &other,
        &["resource-table", "show", "flows", "--host", "host-a"],
    );
    assert!(!ok && err.contains("not found"), "{err}");

    // The contents survive an agent restart (`kill -9`: the last snapshot, taken in the
    // tick after the write); the device sees the element gone.
    let latest = b.cmd("read 3");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.kill();
    let _agent = spawn_agent_in(&s, "host-a", &host_dir, &token_file, &[], None, &sim);
    // The old socket file stays behind a killed agent: attach until the new one answers.
    let mut b2 = None;
    for _ in 0..300 {
        b2 = Device::try_attach(&socket);
        if b2.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut b2 = b2.expect("the restarted agent serves the table again");
    let again = b2.cmd("read 3");
    let text = |l: &str| l.splitn(3, ' ').nth(2).unwrap_or_default().to_owned();
    assert_eq!(text(&again), text(&latest), "{again} vs {latest}");
    assert_eq!(text(&again), "hello from b");

    // Deleted through the CLI: the agent stops serving it and removes its files.
    let (ok, _, err) = cli(
        &s,
        &acme,
        &["resource-table", "delete", "flows", "--host", "host-a"],
    );
    assert!(ok, "{err}");
    test_utils::wait_for(Duration::from_secs(30), || async {
        !std::path::Path::new(&socket).exists()
    })
    .await
    .expect("the agent removes a deleted table's socket");
    assert!(c.list_resource_tables("host-a").await.unwrap().is_empty());
}
