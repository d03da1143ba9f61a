use std::net::Ipv4Addr;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::json;

use super::*;

fn responder() -> Arc<Responder> {
    let config =
        DnsConfig { zone: "cluster.local".into(), listen: "127.0.0.1:0".parse().unwrap(), upstreams: vec![], ttl: 5 };
    let responder = Responder::new(config);
    let catalog = Catalog::default();
    catalog.set(
        vec![
            serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "default"},
                "spec": {"clusterIP": "10.43.0.5", "clusterIPs": ["10.43.0.5"], "ports": [{"name": "http", "port": 80}]}}))
            .unwrap(),
            serde_json::from_value(json!({"metadata": {"name": "ext", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": "web.default.svc.cluster.local"}}))
            .unwrap(),
        ],
        vec![],
    );
    responder.follow(&catalog.listen());
    responder
}

fn ask(responder: &Responder, name: &str, qtype: RecordType) -> Message {
    let mut q = Message::query();
    q.queries.push(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let reply = futures::executor::block_on(responder.handle(&q.to_vec().unwrap(), Transport::Udp)).unwrap();
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, q.metadata.id);
    reply
}

#[test]
fn services_answer_with_their_cluster_ip_and_the_zones_ttl() {
    let r = responder();
    let reply = ask(&r, "web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.metadata.authoritative);
    assert_eq!(reply.answers.len(), 1);
    assert_eq!(reply.answers[0].data, RData::A(A(Ipv4Addr::new(10, 43, 0, 5))));
    assert_eq!(reply.answers[0].ttl, 5);
    // Names are case-insensitive; the question comes back as asked.
    let reply = ask(&r, "WEB.Default.svc.cluster.local.", RecordType::A);
    assert_eq!(reply.answers.len(), 1);
    assert_eq!(reply.queries[0].name.to_ascii(), "WEB.Default.svc.cluster.local.");
}

#[test]
fn nodata_and_nxdomain_are_told_apart() {
    let r = responder();
    let nodata = ask(&r, "web.default.svc.cluster.local.", RecordType::AAAA);
    assert_eq!((nodata.metadata.response_code, nodata.answers.len()), (ResponseCode::NoError, 0));
    assert_eq!(nodata.authorities[0].record_type(), RecordType::SOA);
    let nx = ask(&r, "nope.default.svc.cluster.local.", RecordType::A);
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(nx.authorities[0].record_type(), RecordType::SOA);
}

#[test]
fn srv_external_names_and_the_schema_version() {
    let r = responder();
    let srv = ask(&r, "_http._tcp.web.default.svc.cluster.local.", RecordType::SRV);
    let RData::SRV(record) = &srv.answers[0].data else { panic!("{srv:?}") };
    assert_eq!((record.port, record.target.to_ascii().as_str()), (80, "web.default.svc.cluster.local."));
    assert_eq!(srv.additionals.len(), 1, "the target's address comes along");
    let cname = ask(&r, "ext.default.svc.cluster.local.", RecordType::A);
    assert!(matches!(&cname.answers[0].data, RData::CNAME(c) if c.0.to_ascii() == "web.default.svc.cluster.local."));
    let version = ask(&r, "dns-version.cluster.local.", RecordType::TXT);
    assert_eq!(version.answers.len(), 1);
}

#[test]
fn names_outside_the_zone_without_upstreams_fail_as_servfail() {
    let r = responder();
    assert_eq!(ask(&r, "example.com.", RecordType::A).metadata.response_code, ResponseCode::ServFail);
}

#[test]
fn malformed_packets_get_formerr_or_nothing_and_never_a_panic() {
    let r = responder();
    assert!(futures::executor::block_on(r.handle(&[1, 2, 3], Transport::Udp)).is_none());
    let mut garbage = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0];
    garbage.extend([0xff; 20]);
    let reply = futures::executor::block_on(r.handle(&garbage, Transport::Udp)).unwrap();
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!((reply.metadata.id, reply.metadata.response_code), (0xabcd, ResponseCode::FormErr));
    // Random bytes, and every truncation of a valid query.
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    for len in 0..600 {
        let packet: Vec<u8> = (0..len % 300)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = futures::executor::block_on(r.handle(&packet, Transport::Udp));
    }
    let mut q = Message::query();
    q.queries.push(Query::query(Name::from_ascii("web.default.svc.cluster.local.").unwrap(), RecordType::A));
    let valid = q.to_vec().unwrap();
    for cut in 0..valid.len() {
        let _ = futures::executor::block_on(r.handle(&valid[..cut], Transport::Tcp));
    }
}

#[test]
fn upstreams_leave_out_the_cluster_dns() {
    let servers = ["10.43.0.10".to_string(), "192.0.2.53".to_string(), "not an address".to_string()];
    let skip = ["10.43.0.10".parse().unwrap()];
    assert_eq!(upstreams(&servers, &skip), ["192.0.2.53:53".parse().unwrap()]);
}

#[test]
fn remembered_answers_follow_changes_to_the_zone() {
    let config =
        DnsConfig { zone: "cluster.local".into(), listen: "127.0.0.1:0".parse().unwrap(), upstreams: vec![], ttl: 5 };
    let responder = Responder::new(config);
    let catalog = Catalog::default();
    let changes = catalog.listen();
    let web = |ip: &str| -> k8s_openapi::api::core::v1::Service {
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": 80}]}}))
        .unwrap()
    };
    catalog.set(vec![web("10.43.0.5")], vec![]);
    responder.follow(&changes);
    let first = ask(&responder, "web.default.svc.cluster.local.", RecordType::A);
    let again = ask(&responder, "web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(first.answers, again.answers, "the same answer, from memory");
    catalog.set(vec![web("10.43.0.6")], vec![]);
    responder.follow(&changes);
    let changed = ask(&responder, "web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(changed.answers[0].data, RData::A(A(Ipv4Addr::new(10, 43, 0, 6))));
}
