//! The DNS responder over real sockets: questions over UDP and TCP to the responder on
//! 127.0.0.1, names outside the cluster forwarded to a real resolver (Debian's
//! `unbound`, answering from local-data on 127.0.0.1), and answered from the cache
//! once that resolver is gone.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, RecordType};
use krate_net::catalog::Catalog;
use krate_net::dns::{self, DnsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Unbound {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Unbound {
    fn start(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  access-control: 127.0.0.0/8 allow\n  do-ip6: no\n  local-zone: \"example.test.\" static\n  local-data: \"www.example.test. 300 IN A 192.0.2.99\"\nremote-control:\n  control-enable: no\n"
        );
        let path = dir.path().join("unbound.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("unbound")
            .args(["-d", "-c", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run unbound (apt-get install -y unbound)");
        Unbound { child, _dir: dir }
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn question(name: &str, qtype: RecordType) -> Message {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.queries.push(Query::query(Name::from_ascii(name).unwrap(), qtype));
    q
}

async fn over_udp(server: SocketAddr, q: &Message) -> Option<Message> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), socket.recv(&mut buf)).await.ok()?.ok()?;
    Message::from_vec(&buf[..n]).ok()
}

async fn over_tcp(server: SocketAddr, q: &Message) -> Message {
    let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
    let bytes = q.to_vec().unwrap();
    stream.write_all(&(bytes.len() as u16).to_be_bytes()).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut answer = vec![0u8; usize::from(len)];
    stream.read_exact(&mut answer).await.unwrap();
    Message::from_vec(&answer).unwrap()
}

fn address(m: &Message) -> Option<Ipv4Addr> {
    m.answers.iter().find_map(|r| match &r.data {
        RData::A(A(ip)) => Some(*ip),
        _ => None,
    })
}

#[tokio::test]
async fn the_zone_is_answered_and_other_names_are_forwarded_then_cached() {
    let upstream_port = free_port();
    let unbound = Unbound::start(upstream_port);
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let catalog = Catalog::default();
    catalog.set(
        vec![serde_json::from_value(serde_json::json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.43.0.5", "clusterIPs": ["10.43.0.5"], "ports": [{"port": 80}]}}))
        .unwrap()],
        vec![],
    );
    let config = DnsConfig {
        zone: "cluster.local".into(),
        listen,
        upstreams: vec![format!("127.0.0.1:{upstream_port}").parse().unwrap()],
        ttl: 5,
    };
    let serving = {
        let catalog = catalog.clone();
        tokio::spawn(async move { dns::run(&catalog, config).await })
    };
    let web = question("web.default.svc.cluster.local.", RecordType::A);
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        if let Some(a) = over_udp(listen, &web).await.filter(|a| !a.answers.is_empty()) {
            break a;
        }
        assert!(Instant::now() < deadline, "the responder did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(address(&answer), Some(Ipv4Addr::new(10, 43, 0, 5)));
    assert_eq!(address(&over_tcp(listen, &web).await), Some(Ipv4Addr::new(10, 43, 0, 5)), "over TCP too");

    let www = question("www.example.test.", RecordType::A);
    let deadline = Instant::now() + Duration::from_secs(10);
    let forwarded = loop {
        // unbound may still be starting.
        if let Some(a) = over_udp(listen, &www).await.filter(|a| a.metadata.response_code == ResponseCode::NoError) {
            break a;
        }
        assert!(Instant::now() < deadline, "the upstream answer never came through");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(address(&forwarded), Some(Ipv4Addr::new(192, 0, 2, 99)));
    assert!(!forwarded.metadata.authoritative, "not the cluster's to answer");
    let missing = over_udp(listen, &question("nope.example.test.", RecordType::A)).await.unwrap();
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain, "the upstream's NXDOMAIN comes through");

    drop(unbound);
    let cached = over_udp(listen, &www).await.unwrap();
    assert_eq!(address(&cached), Some(Ipv4Addr::new(192, 0, 2, 99)), "answered from the cache");
    assert!(cached.answers[0].ttl <= 300);
    let uncached = over_udp(listen, &question("other.example.test.", RecordType::A)).await.unwrap();
    assert_eq!(uncached.metadata.response_code, ResponseCode::ServFail, "no upstream, no cache: SERVFAIL");
    serving.abort();
}

#[tokio::test]
async fn garbage_on_the_wire_leaves_the_responder_serving() {
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let catalog = Catalog::default();
    catalog.set(vec![], vec![]);
    let config = DnsConfig { zone: "cluster.local".into(), listen, upstreams: vec![], ttl: 5 };
    let serving = {
        let catalog = catalog.clone();
        tokio::spawn(async move { dns::run(&catalog, config).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut seed: u32 = 0x1234_5678;
    for len in 0..2000usize {
        let packet: Vec<u8> = (0..len % 512)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        socket.send_to(&packet, listen).await.unwrap();
    }
    // A TCP client that sends a length and then hangs up.
    let mut stream = tokio::net::TcpStream::connect(listen).await.unwrap();
    stream.write_all(&[0x40, 0x00, 1, 2, 3]).await.unwrap();
    drop(stream);
    // UDP may drop a query behind 2,000 garbage packets in the socket buffers, as it may
    // any: ask again, as resolvers do; what must hold is that the responder answers.
    let mut apex = None;
    for _ in 0..5 {
        apex = over_udp(listen, &question("cluster.local.", RecordType::SOA)).await;
        if apex.is_some() {
            break;
        }
    }
    let apex = apex.expect("still answering");
    assert_eq!(apex.answers[0].record_type(), RecordType::SOA);
    assert!(!serving.is_finished());
    serving.abort();
}
