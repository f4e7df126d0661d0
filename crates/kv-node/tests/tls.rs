//! TLS (issue 14) with the real binaries and certificates made here with
//! `rcgen`: a round trip on a node; a client that does not trust the CA
//! refused; plain HTTP and a silent client on the TLS port closed, not
//! left hanging; a 3-node replicated cluster over mutual TLS (a write on
//! one node read on another, a proxy in front), node-to-node paths refused
//! without a client certificate from the CA; and SIGHUP serving a new
//! certificate while an open keep-alive connection keeps working; SIGHUP
//! on a node without TLS logged and ignored, not fatal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use kv_http::tls::{Tls, TlsArgs};
use kv_testkit::cluster::{send, wait_until, BOUND};
use kv_testkit::{binary, exchange_then_closed, Cluster, ClusterOpts, Process};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SerialNumber,
};

/// A CA and the files of the certificates it signs, in a temporary dir.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca: PathBuf,
}

/// A certificate's files and its DER (to compare with what a server sent).
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("kv test CA {name}"));
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("a self-signed CA");
        let ca = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca, cert.pem()).expect("write the CA");
        Pki {
            dir,
            issuer: Issuer::new(params, key),
            ca,
        }
    }

    /// A certificate for 127.0.0.1 and localhost, good for a server and a
    /// client (mutual TLS between nodes), with serial `serial`.
    fn leaf(&self, file: &str, serial: u64) -> Leaf {
        let leaf = self.make_leaf(serial);
        let (cert, key) = self.paths(file);
        std::fs::write(&cert, &leaf.0).expect("write the certificate");
        std::fs::write(&key, &leaf.1).expect("write the key");
        Leaf {
            cert,
            key,
            der: leaf.2,
        }
    }

    fn paths(&self, file: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join(format!("{file}.pem")),
            self.dir.path().join(format!("{file}-key.pem")),
        )
    }

    /// (certificate PEM, key PEM, certificate DER)
    fn make_leaf(&self, serial: u64) -> (String, String, Vec<u8>) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("leaf params");
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("a leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign a leaf");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// What a test client connects with: `ca` trusted, `identity` presented.
fn client(ca: &Path, identity: Option<&Leaf>) -> Arc<Tls> {
    TlsArgs {
        tls_cert: identity.map(|leaf| leaf.cert.clone()),
        tls_key: identity.map(|leaf| leaf.key.clone()),
        tls_ca: Some(ca.to_path_buf()),
    }
    .load()
    .expect("client TLS settings")
    .expect("a CA is set")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// An open keep-alive HTTP/1.1 connection over TLS, and the DER of the
/// certificate the server presented.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    leaf: Vec<u8>,
}

async fn open(tls: &Tls, addr: SocketAddr) -> std::io::Result<Conn> {
    let stream = tokio::time::timeout(BOUND, Tls::connect(Some(tls), &addr.to_string()))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    let leaf = stream
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.as_ref().to_vec())
        .expect("a TLS server presents a certificate");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(Conn { sender, leaf })
}

/// One request on `conn`: status and body (bounded).
async fn call(
    conn: &mut Conn,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let exchange = async {
        conn.sender.ready().await.map_err(std::io::Error::other)?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .map_err(std::io::Error::other)?;
        let response = conn
            .sender
            .send_request(request)
            .await
            .map_err(std::io::Error::other)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .map_err(|_| std::io::Error::other("no answer in time"))?
}

/// One request on a fresh TLS connection.
fn request(
    tls: &Tls,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    runtime().block_on(async {
        let mut conn = open(tls, addr).await?;
        call(&mut conn, method, path, body).await
    })
}

fn tls_args<'a>(pki: &'a Pki, leaf: &'a Leaf, mutual: bool) -> Vec<&'a str> {
    let mut args = vec![
        "--tls-cert",
        leaf.cert.to_str().unwrap(),
        "--tls-key",
        leaf.key.to_str().unwrap(),
    ];
    if mutual {
        args.extend(["--tls-ca", pki.ca.to_str().unwrap()]);
    }
    args
}

fn standalone(dir: &Path, tls: &[&str]) -> Process {
    let data = dir.join("data");
    let mut args = vec![
        "--port",
        "0",
        "--data-dir",
        data.to_str().unwrap(),
        "--header-timeout",
        "2s",
    ];
    args.extend_from_slice(tls);
    Process::spawn(&binary("kv-node"), &args)
}

#[test]
fn round_trip_untrusted_clients_and_plain_http_on_a_tls_node() {
    let pki = Pki::new("main");
    let leaf = pki.leaf("node", 1);
    let dir = tempfile::tempdir().unwrap();
    let node = standalone(dir.path(), &tls_args(&pki, &leaf, true));
    assert!(
        node.log().contains("listening on https://"),
        "{}",
        node.log()
    );
    let trusting = client(&pki.ca, None);

    // A round trip over TLS.
    let put = request(
        &trusting,
        node.addr,
        "PUT",
        "/tls-key",
        Some(r#"{"value": 42}"#),
    )
    .unwrap();
    assert_eq!(put.0, 200, "{put:?}");
    let get = request(&trusting, node.addr, "GET", "/tls-key", None).unwrap();
    assert_eq!(get, (200, "{\"value\":42}\n".to_owned()));

    // A client that trusts another CA refuses the node's certificate.
    let other = Pki::new("other");
    let refused = request(&client(&other.ca, None), node.addr, "GET", "/tls-key", None);
    let error = refused.expect_err("the node's certificate is not from the client's CA");
    assert!(
        error.to_string().contains("certificate"),
        "the failure names the certificate: {error}"
    );

    // Plain HTTP on the TLS port: a JSON 400 saying so, then a close.
    let (answer, closed) =
        exchange_then_closed(node.addr, b"GET /tls-key HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert!(
        json["error"].as_str().is_some_and(|e| e.contains("TLS")),
        "{json}"
    );
    assert!(closed, "the connection is closed after the 400");

    // A client that connects and says nothing is closed by the handshake
    // timeout (--header-timeout 2s), not left holding the connection; the
    // read below would fail with a timeout if it were left open.
    let mut silent = std::net::TcpStream::connect(node.addr).unwrap();
    silent.set_read_timeout(Some(BOUND)).unwrap();
    let mut buf = [0u8; 16];
    let read = std::io::Read::read(&mut silent, &mut buf);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "closed by the server: {read:?}"
    );

    // Node-to-node paths want a client certificate from the CA (mutual TLS
    // is on: the node has --tls-ca); other paths do not.
    let (status, body) = request(&trusting, node.addr, "POST", "/-/raft/vote", Some("x")).unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("client certificate"), "{body}");
    let with_cert = client(&pki.ca, Some(&leaf));
    let (status, body) = request(&with_cert, node.addr, "POST", "/-/raft/vote", Some("x")).unwrap();
    assert_ne!(status, 403, "a verified client certificate passes: {body}");
    // A client certificate from another CA fails the handshake.
    let stranger = other.leaf("stranger", 9);
    let refused = request(
        &client(&pki.ca, Some(&stranger)),
        node.addr,
        "GET",
        "/tls-key",
        None,
    );
    assert!(
        refused.is_err(),
        "a foreign client certificate is refused: {refused:?}"
    );
}

#[test]
fn replicated_cluster_over_mutual_tls_with_a_proxy() {
    let pki = Pki::new("cluster");
    let leaf = pki.leaf("node", 1);
    let extra: Vec<String> = tls_args(&pki, &leaf, true)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let mut cluster = Cluster::create(
        3,
        3,
        ClusterOpts {
            shards: 2,
            extra,
            ..ClusterOpts::default()
        },
    );
    for id in cluster.members() {
        cluster.restart(id);
    }
    let trusting = client(&pki.ca, None);
    // A write on node 1, once the shards have leaders (raft over mutual
    // TLS elects them), read on node 2.
    wait_until("a write through node 1 over TLS", BOUND, || {
        request(
            &trusting,
            cluster.addr(1),
            "PUT",
            "/replicated",
            Some(r#"{"value": "v1"}"#),
        )
        .is_ok_and(|(status, _)| status == 200)
    });
    wait_until("the write read on node 2 over TLS", BOUND, || {
        request(&trusting, cluster.addr(2), "GET", "/replicated", None)
            .is_ok_and(|answer| answer == (200, "{\"value\":\"v1\"}\n".to_owned()))
    });
    // Raft paths without a client certificate: refused, before raft sees
    // them; the nodes' own traffic (with certificates) still flows.
    let (status, body) = request(
        &trusting,
        cluster.addr(2),
        "POST",
        "/-/raft/append",
        Some("x"),
    )
    .unwrap();
    assert_eq!(status, 403, "{body}");
    // A forged forward (a client posing as a node) is refused too.
    let (status, body) = runtime().block_on(async {
        let mut conn = open(&trusting, cluster.addr(3)).await.unwrap();
        conn.sender.ready().await.unwrap();
        let request = Request::get("/replicated")
            .header("host", "127.0.0.1")
            .header(kv_node_forwarded_by(), "1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = conn.sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    });
    assert_eq!(status, 403, "{body}");

    // A proxy in front, plain HTTP to its clients, TLS (CA only) to the
    // nodes: discovery, routing and health checks all speak TLS.
    let nodes = cluster
        .ports()
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let proxy = Process::spawn(
        &binary("kv-proxy"),
        &[
            "--port",
            "0",
            "--nodes",
            &nodes,
            "--tls-ca",
            pki.ca.to_str().unwrap(),
        ],
    );
    let read = send(proxy.addr, "GET", "/replicated", &[], None).unwrap();
    assert_eq!(read.status, 200, "{read:?}\n{}", proxy.log());
    assert_eq!(read.text(), "{\"value\":\"v1\"}\n");
    let write = send(
        proxy.addr,
        "PUT",
        "/via-proxy",
        &[],
        Some(r#"{"value": 7}"#),
    )
    .unwrap();
    assert_eq!(write.status, 200, "{write:?}");
    wait_until("the proxy's write read on node 3", BOUND, || {
        request(&trusting, cluster.addr(3), "GET", "/via-proxy", None)
            .is_ok_and(|answer| answer == (200, "{\"value\":7}\n".to_owned()))
    });
}

/// The header a node marks a forwarded request with.
fn kv_node_forwarded_by() -> &'static str {
    "x-kv-forwarded-by"
}

#[test]
fn sighup_serves_a_new_certificate_and_keeps_open_connections() {
    let pki = Pki::new("reload");
    let first = pki.leaf("node", 1);
    let dir = tempfile::tempdir().unwrap();
    // (With --tls-ca: the test kit probes a TLS port with the server's CA.)
    let node = standalone(dir.path(), &tls_args(&pki, &first, true));
    let trusting = client(&pki.ca, None);
    let rt = runtime();
    let mut kept = rt.block_on(open(&trusting, node.addr)).unwrap();
    assert_eq!(kept.leaf, first.der, "the first certificate is served");
    let put = rt
        .block_on(call(&mut kept, "PUT", "/reload", Some(r#"{"value": 1}"#)))
        .unwrap();
    assert_eq!(put.0, 200, "{put:?}");

    // New files in place, then SIGHUP.
    let second = pki.leaf("node", 2);
    assert_ne!(second.der, first.der);
    node.hangup();
    assert!(
        node.log_shows("TLS certificates reloaded"),
        "{}",
        node.log()
    );
    let fresh = rt.block_on(open(&trusting, node.addr)).unwrap();
    assert_eq!(
        fresh.leaf, second.der,
        "a new handshake gets the new certificate"
    );
    // The connection opened before the reload still serves.
    let get = rt
        .block_on(call(&mut kept, "GET", "/reload", None))
        .unwrap();
    assert_eq!(get, (200, "{\"value\":1}\n".to_owned()));

    // A broken file on reload: logged, and the last good certificate stays.
    std::fs::write(&second.cert, "not a certificate\n").unwrap();
    node.hangup();
    assert!(
        node.log_shows("TLS certificates not reloaded"),
        "{}",
        node.log()
    );
    let after = rt.block_on(open(&trusting, node.addr)).unwrap();
    assert_eq!(after.leaf, second.der, "the previous certificate is kept");
}

/// A `kill -HUP` sent to every kv process (how certificates are reloaded)
/// must not stop one that serves plain HTTP: it logs that there is nothing
/// to reload and keeps serving. Before, only a TLS node installed the
/// handler, and a plain one died of the signal's default action.
#[test]
fn sighup_on_a_node_without_tls_is_logged_and_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = standalone(dir.path(), &[]);
    let put = send(node.addr, "PUT", "/hup", &[], Some(r#"{"value": 1}"#)).unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    node.hangup();
    assert!(
        node.log_shows("SIGHUP: no TLS certificates to reload"),
        "{}",
        node.log()
    );
    assert_eq!(
        node.try_exit_code(),
        None,
        "the node exited: {}",
        node.log()
    );
    let get = send(node.addr, "GET", "/hup", &[], None).unwrap();
    assert_eq!(
        (get.status, get.text()),
        (200, "{\"value\":1}\n".to_owned())
    );
}
