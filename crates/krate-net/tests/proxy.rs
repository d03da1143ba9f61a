//! The service proxy's rules in a real kernel: network namespaces as pods on a bridge of
//! the test's own, Python HTTP servers as endpoints, and the rules the proxy computes
//! written into a table of the test's own with `nft`. Everything the test creates
//! (namespaces, bridge, veths, the table, the servers) goes when it ends, even on failure.
//! Needs root and nftables.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use krate_net::proxy::rules::{self, Endpoint, NodeContext, ServicePort, Share};
use krate_net::proxy::{apply_pass, nft};

/// A bridge with pod-like namespaces on it, a table, and an outside namespace that
/// reaches the node over a veth of its own.
struct Lab {
    tag: String,
    /// 10.`net`.x.y addresses, apart per test.
    net: u8,
    namespaces: Vec<String>,
    servers: Vec<Child>,
    base: nft::Base,
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("running a command");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Lab {
    fn new(n: u8) -> Lab {
        let tag = format!("kp{n}x{}", std::process::id() % 10000);
        let net = 230 + n;
        let bridge = format!("{tag}br");
        let service_cidrs = vec![format!("10.{net}.100.0/24").parse().unwrap()];
        let base = nft::Base { table: format!("krate-{tag}"), bridge: bridge.clone(), node_ips: vec![], service_cidrs };
        let lab = Lab { tag, net, namespaces: vec![], servers: vec![], base };
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        sh(&["ip", "addr", "add", &format!("10.{net}.0.1/24"), "dev", &bridge]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        lab
    }

    fn bridge(&self) -> &str {
        &self.base.bridge
    }

    fn pod_cidr(&self) -> krate_net::Cidr {
        format!("10.{}.0.0/24", self.net).parse().unwrap()
    }

    /// A namespace on the bridge at 10.net.0.`last`.
    fn pod(&mut self, name: &str, last: u8) -> Ipv4Addr {
        let ns = format!("{}-{name}", self.tag);
        let (host, inner) = (format!("{}h{last}", self.tag), format!("{}p{last}", self.tag));
        sh(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        sh(&["ip", "link", "add", &host, "type", "veth", "peer", "name", &inner]);
        sh(&["ip", "link", "set", &host, "master", self.bridge()]);
        sh(&["ip", "link", "set", &host, "up"]);
        // Hairpin, as the CNI bridge plugin sets it: a pod may reach itself through a VIP.
        sh(&["ip", "link", "set", &host, "type", "bridge_slave", "hairpin", "on"]);
        sh(&["ip", "link", "set", &inner, "netns", &ns]);
        let ip = Ipv4Addr::new(10, self.net, 0, last);
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", &inner]);
        sh(&["ip", "-n", &ns, "link", "set", &inner, "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &ns, "route", "add", "default", "via", &format!("10.{}.0.1", self.net)]);
        ip
    }

    /// A namespace outside the node, on a veth to it: (its address, the node's).
    fn outside(&mut self) -> (String, Ipv4Addr) {
        let ns = format!("{}-out", self.tag);
        let (host, inner) = (format!("{}oh", self.tag), format!("{}oi", self.tag));
        sh(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        sh(&["ip", "link", "add", &host, "type", "veth", "peer", "name", &inner]);
        let node = Ipv4Addr::new(10, self.net, 9, 1);
        sh(&["ip", "addr", "add", &format!("{node}/30"), "dev", &host]);
        sh(&["ip", "link", "set", &host, "up"]);
        sh(&["ip", "link", "set", &inner, "netns", &ns]);
        sh(&["ip", "-n", &ns, "addr", "add", &format!("10.{}.9.2/30", self.net), "dev", &inner]);
        sh(&["ip", "-n", &ns, "link", "set", &inner, "up"]);
        sh(&["ip", "-n", &ns, "route", "add", "default", "via", &node.to_string()]);
        (ns, node)
    }

    /// An HTTP server in pod `name` answering its name on port 8080.
    fn serve(&mut self, name: &str) {
        let ns = format!("{}-{name}", self.tag);
        let script = format!(
            "import http.server\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        body = ('{name} ' + self.client_address[0]).encode()\n        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)\n    def log_message(self, *a): pass\nhttp.server.ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()\n"
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(child);
        let ip = self.ip_of(name);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.get(name, &format!("{ip}:8080")).is_none() {
            assert!(Instant::now() < deadline, "the server in {name} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ip_of(&self, name: &str) -> String {
        let ns = format!("{}-{name}", self.tag);
        let out = sh(&["ip", "-n", &ns, "-4", "-o", "addr", "show"]);
        out.lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .find(|a| !a.starts_with("127."))
            .map(|a| a.split('/').next().unwrap().to_string())
            .unwrap()
    }

    /// One HTTP GET from namespace `from` (a pod name, or a full namespace name): the
    /// body, or the error class (`refused`, `timeout`).
    fn fetch(&self, from: &str, target: &str) -> Result<String, String> {
        let ns = if from.starts_with(&self.tag) { from.to_string() } else { format!("{}-{from}", self.tag) };
        let script = format!(
            "import urllib.request, socket, sys\ntry:\n    print(urllib.request.urlopen('http://{target}/', timeout=1.5).read().decode(), end='')\nexcept Exception as e:\n    r = getattr(e, 'reason', e)\n    print('ERR ' + ('refused' if isinstance(r, ConnectionRefusedError) else 'timeout' if isinstance(r, (socket.timeout, TimeoutError)) else repr(r)), end='')\n"
        );
        let out = Command::new("ip").args(["netns", "exec", &ns, "python3", "-c", &script]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match text.strip_prefix("ERR ") {
            Some(err) => Err(err.to_string()),
            None => Ok(text),
        }
    }

    fn get(&self, from: &str, target: &str) -> Option<String> {
        self.fetch(from, target).ok()
    }

    fn node(&self) -> NodeContext {
        NodeContext { pod_cidr: self.pod_cidr() }
    }

    fn share(&self, sp: &ServicePort) -> Share {
        rules::share_of(sp, &self.node())
    }

    /// A full sync with `sp` the only service.
    fn full(&self, sp: &ServicePort) {
        run(apply_pass(&self.base.table, &self.base, true, &Share::default(), &self.share(sp))).unwrap();
    }

    fn partial(&self, before: &ServicePort, after: &ServicePort) {
        run(apply_pass(&self.base.table, &self.base, false, &self.share(before), &self.share(after))).unwrap();
    }

    fn rule_count(&self) -> usize {
        sh(&["nft", "list", "table", "ip", &self.base.table]).lines().filter(|l| l.contains("dnat to")).count()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("nft").args(["delete", "table", "ip", &self.base.table]).output();
        let _ = Command::new("ip").args(["link", "del", &self.base.bridge]).output();
        let _ = Command::new("ip").args(["link", "del", &format!("{}oh", self.tag)]).output();
    }
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

fn endpoint(ip: Ipv4Addr, local: bool) -> Endpoint {
    Endpoint { ip, port: 8080, ready: true, serving: true, terminating: false, local }
}

fn service(lab: &Lab, name: &str, vip_last: u8, endpoints: Vec<Endpoint>) -> ServicePort {
    ServicePort::cluster_ip("default", name, Ipv4Addr::new(10, lab.net, 100, vip_last), 80, endpoints)
}

fn vip(sp: &ServicePort) -> String {
    format!("{}:{}", sp.cluster_ip.unwrap(), sp.port)
}

/// Who answered: the first word of each body.
fn answered_by(bodies: &[Option<String>]) -> std::collections::BTreeSet<String> {
    bodies.iter().flatten().filter_map(|b| b.split_whitespace().next().map(String::from)).collect()
}

#[test]
fn a_cluster_ip_balances_over_its_endpoints_and_follows_their_changes() {
    let mut lab = Lab::new(1);
    let a = lab.pod("a", 11);
    let b = lab.pod("b", 12);
    lab.pod("client", 10);
    lab.serve("a");
    lab.serve("b");
    let both = service(&lab, "web", 5, vec![endpoint(a, true), endpoint(b, true)]);
    lab.full(&both);
    let bodies: Vec<Option<String>> = (0..24).map(|_| lab.get("client", &vip(&both))).collect();
    assert_eq!(answered_by(&bodies), ["a", "b"].map(String::from).into(), "{bodies:?}");
    assert!(bodies.iter().flatten().all(|b| b.ends_with(" 10.231.0.10")), "pod traffic keeps its source: {bodies:?}");
    let one = service(&lab, "web", 5, vec![endpoint(a, true)]);
    lab.partial(&both, &one);
    let bodies: Vec<Option<String>> = (0..8).map(|_| lab.get("client", &vip(&one))).collect();
    assert_eq!(answered_by(&bodies), ["a"].map(String::from).into(), "{bodies:?}");
    // A second full sync over the same state leaves no duplicate rules.
    let before = lab.rule_count();
    lab.full(&one);
    lab.full(&one);
    assert_eq!(lab.rule_count(), before);
}

#[test]
fn a_service_without_endpoints_refuses_connections_at_once() {
    let mut lab = Lab::new(2);
    lab.pod("client", 10);
    let empty = service(&lab, "empty", 6, vec![]);
    lab.full(&empty);
    let started = Instant::now();
    assert_eq!(lab.fetch("client", &vip(&empty)), Err("refused".into()));
    assert!(started.elapsed() < Duration::from_secs(1), "refused, not timed out: {:?}", started.elapsed());
}

#[test]
fn an_address_of_the_service_range_without_a_service_goes_nowhere() {
    let mut lab = Lab::new(6);
    let a = lab.pod("a", 11);
    lab.pod("client", 10);
    lab.serve("a");
    let svc = service(&lab, "web", 5, vec![endpoint(a, true)]);
    lab.full(&svc);
    assert!(lab.get("client", &vip(&svc)).is_some());
    let unallocated = format!("10.{}.100.77:80", lab.net);
    assert_eq!(lab.fetch("client", &unallocated), Err("timeout".into()), "dropped, not routed out of the node");
    let counter = sh(&["nft", "list", "chain", "ip", &lab.base.table, "cluster-ips-check"]);
    assert!(counter.contains(&format!("10.{}.100.0/24", lab.net)), "{counter}");
}

#[test]
fn a_refused_transaction_changes_nothing() {
    let mut lab = Lab::new(7);
    let a = lab.pod("a", 11);
    lab.pod("client", 10);
    lab.serve("a");
    let svc = service(&lab, "web", 5, vec![endpoint(a, true)]);
    lab.full(&svc);
    let before = sh(&["nft", "list", "table", "ip", &lab.base.table]);
    let mut broken = lab.share(&svc);
    broken.chains.insert("service-BROKEN".into(), vec!["this is not a rule".into()]);
    for full in [false, true] {
        let result = run(apply_pass(&lab.base.table, &lab.base, full, &lab.share(&svc), &broken));
        let err = result.expect_err("nft refuses the rule").to_string();
        assert!(err.contains("nft refused the transaction"), "{err}");
        assert_eq!(sh(&["nft", "list", "table", "ip", &lab.base.table]), before, "nothing half-applied (full: {full})");
        assert!(lab.get("client", &vip(&svc)).is_some(), "the service still answers");
    }
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    let mut lab = Lab::new(3);
    let a = lab.pod("a", 11);
    lab.serve("a");
    let svc = service(&lab, "self", 7, vec![endpoint(a, true)]);
    lab.full(&svc);
    let body = lab.get("a", &vip(&svc)).expect("hairpin traffic comes back");
    assert_eq!(body, "a 10.233.0.1", "hairpin traffic is masqueraded to the bridge's address");
}

#[test]
fn client_ip_affinity_sends_a_client_to_one_endpoint() {
    let mut lab = Lab::new(4);
    let a = lab.pod("a", 11);
    let b = lab.pod("b", 12);
    lab.pod("client", 10);
    lab.serve("a");
    lab.serve("b");
    let mut sticky = service(&lab, "sticky", 8, vec![endpoint(a, true), endpoint(b, true)]);
    sticky.affinity = Some(60);
    lab.full(&sticky);
    let bodies: Vec<Option<String>> = (0..12).map(|_| lab.get("client", &vip(&sticky))).collect();
    assert_eq!(answered_by(&bodies).len(), 1, "{bodies:?}");
    assert_eq!(bodies.iter().flatten().count(), 12);
}

#[test]
fn node_ports_answer_outside_clients_and_local_policy_keeps_their_address() {
    let mut lab = Lab::new(5);
    let a = lab.pod("a", 11);
    lab.serve("a");
    let (outside, node) = lab.outside();
    lab.base.node_ips = vec![node];
    let mut svc = service(&lab, "np", 9, vec![endpoint(a, true)]);
    svc.node_port = Some(30080);
    lab.full(&svc);
    let target = format!("{node}:30080");
    let body = lab.get(&outside, &target).expect("the node port answers");
    assert_eq!(body, "a 10.235.0.1", "cluster policy masquerades: {body}");
    svc.external_local = true;
    lab.full(&svc);
    let body = lab.get(&outside, &target).expect("a local endpoint answers");
    assert_eq!(body, "a 10.235.9.2", "local policy keeps the client's address: {body}");
    svc.endpoints[0].local = false;
    lab.full(&svc);
    assert_eq!(lab.fetch(&outside, &target), Err("timeout".into()), "no local endpoint: dropped");
}
