//! `NBD_OPT_STARTTLS`: our server and client over TLS from one CA, a server that
//! requires it refusing clear text, a client of another CA refused, and the real
//! clients (`nbdinfo`, `qemu-img`) speaking it to our server.

use std::process::Command;
use std::sync::Arc;

use nbd::proto::REP_ERR_TLS_REQD;
use nbd::{ClientTls, FileDevice, NbdClient, NbdError, ServeConfig};

use crate::util::{random_file, require, run_ok, tcp_addr, tcp_any};

struct Pki {
    ca: tls::Ca,
    server: tls::Issued,
    client: tls::Issued,
}

fn pki() -> Pki {
    let ca = tls::Ca::generate().unwrap();
    let server = ca
        .issue_server(&["127.0.0.1".into(), "host-a".into()])
        .unwrap();
    let client = ca.issue_client("host-b").unwrap();
    Pki { ca, server, client }
}

fn server(p: &Pki, path: &std::path::Path) -> nbd::ServerHandle {
    let dev = FileDevice::open(path, false).unwrap();
    let mut cfg = ServeConfig::new(tcp_any()).export("disk", Arc::new(dev));
    cfg.tls = Some(Arc::new(
        tls::server_config(p.ca.cert_pem(), &p.server).unwrap(),
    ));
    cfg.tls_required = true;
    nbd::serve(cfg).unwrap()
}

fn client_tls(ca_pem: &str, id: Option<&tls::Issued>, name: &str) -> ClientTls {
    ClientTls {
        config: Arc::new(tls::client_config(ca_pem, id).unwrap()),
        server_name: name.to_owned(),
    }
}

#[test]
fn blocks_cross_over_tls_and_clear_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "disk", 4 << 20, 7);
    let p = pki();
    let h = server(&p, &path);
    let addr = nbd::NbdAddr::Tcp(tcp_addr(&h));

    // The server is verified by its name (a host name, not only the address).
    let t = client_tls(p.ca.cert_pem(), Some(&p.client), "host-a");
    let mut c = NbdClient::connect_tls(&addr, "disk", Default::default(), Some(&t)).unwrap();
    assert_eq!(c.size(), 4 << 20);
    let mut buf = vec![0u8; 1 << 20];
    c.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, data[1 << 20..2 << 20]);
    c.write_at(&[0xab; 4096], 0).unwrap();
    c.flush().unwrap();
    let mut back = [0u8; 4096];
    c.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [0xab; 4096]);
    c.disconnect().unwrap();

    // Clear text: every option but STARTTLS is refused.
    match NbdClient::connect(&addr, "disk") {
        Err(NbdError::OptionRefused { reply, .. }) => assert_eq!(reply, REP_ERR_TLS_REQD),
        other => panic!("clear text was not refused: {other:?}"),
    }
    // A client that trusts another CA does not trust this server.
    let other = tls::Ca::generate().unwrap();
    let foreign = client_tls(other.cert_pem(), None, "host-a");
    assert!(NbdClient::connect_tls(&addr, "disk", Default::default(), Some(&foreign)).is_err());
    // The wrong name is refused too.
    let misnamed = client_tls(p.ca.cert_pem(), None, "host-z");
    assert!(NbdClient::connect_tls(&addr, "disk", Default::default(), Some(&misnamed)).is_err());
    // The server still serves good clients afterwards.
    let mut c = NbdClient::connect_tls(&addr, "disk", Default::default(), Some(&t)).unwrap();
    c.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [0xab; 4096]);
}

#[test]
fn a_server_without_tls_refuses_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = random_file(dir.path(), "disk", 1 << 20, 3);
    let h = crate::util::serve_file(&path, "disk", true);
    let p = pki();
    let t = client_tls(p.ca.cert_pem(), None, "127.0.0.1");
    let addr = nbd::NbdAddr::Tcp(tcp_addr(&h));
    match NbdClient::connect_tls(&addr, "disk", Default::default(), Some(&t)) {
        Err(NbdError::OptionRefused { option, .. }) => assert_eq!(option, "NBD_OPT_STARTTLS"),
        other => panic!("{other:?}"),
    }
}

/// libnbd and QEMU (GnuTLS) read a directory of PEM files.
fn cert_dir(p: &Pki, dir: &std::path::Path) -> std::path::PathBuf {
    let d = dir.join("pki");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("ca-cert.pem"), p.ca.cert_pem()).unwrap();
    std::fs::write(d.join("client-cert.pem"), &p.client.cert_pem).unwrap();
    std::fs::write(d.join("client-key.pem"), &p.client.key_pem).unwrap();
    d
}

#[test]
fn nbdinfo_and_qemu_img_speak_starttls_to_our_server() {
    require("nbdinfo");
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = random_file(dir.path(), "disk", 2 << 20, 5);
    let p = pki();
    let h = server(&p, &path);
    let a = tcp_addr(&h);
    let certs = cert_dir(&p, dir.path());
    let out = run_ok(Command::new("nbdinfo").arg("--size").arg(format!(
        "nbds://127.0.0.1:{}/disk?tls-certificates={}",
        a.port(),
        certs.display()
    )));
    assert_eq!(out.trim(), (2u64 << 20).to_string());
    let out = run_ok(Command::new("qemu-img").args([
        "info",
        "--output=json",
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            certs.display()
        ),
        "--image-opts",
        &format!(
            "driver=nbd,host=127.0.0.1,port={},export=disk,tls-creds=tls0",
            a.port()
        ),
    ]));
    assert!(
        out.contains(&format!("\"virtual-size\": {}", 2u64 << 20)),
        "{out}"
    );
    // Without TLS the same tool is refused.
    let plain = Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd://127.0.0.1:{}/disk", a.port()))
        .output()
        .unwrap();
    assert!(!plain.status.success());
}
