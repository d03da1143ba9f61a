//! Protobuf against JSON for 10,000 pods, in the same run on the same server: a list
//! and a watch from resourceVersion 0 (every pod as an ADDED event), each read by
//! client-go's typed client (the project's `clients/go-protobuf`) decoding into Go
//! structs as controllers do, rounds alternating between the encodings. Also the bytes
//! on the wire and the server's time to answer a list, read raw without decoding.
//!
//!     cargo bench -p krate --bench protobuf
//!     KRATE_BENCH_N=2000 cargo bench -p krate --bench protobuf
//!
//! Prints a report; numbers are recorded in BENCHMARKS.md.

mod common;

use std::time::{Duration, Instant};

use common::BenchServer;

const ROUNDS: usize = 7;
const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One raw list read: (bytes, time), the body fully received but not decoded.
async fn raw_list(client: &kube::Client, accept: &str) -> (usize, Duration) {
    let started = Instant::now();
    let req = http::Request::builder().uri("/api/v1/namespaces/default/pods").header("Accept", accept);
    let resp = client.send(req.body(Vec::new()).unwrap().map(kube::client::Body::from)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with(accept), "asked for {accept}, got {content_type}");
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    (body.len(), started.elapsed())
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("KRATE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let client_go = common::goclient::path();
    let server = BenchServer::start(&["--disable-agent"]).await;
    println!("protobuf vs JSON: {n} pods, {ROUNDS} rounds alternating (client-go typed clients)");

    // The Go client creates the pods, then times each round's list and watch.
    let out = std::process::Command::new(&client_go)
        .arg("bench")
        .arg(&server.kubeconfig)
        .args(["default", &n.to_string(), &ROUNDS.to_string()])
        .output()
        .expect("run the client-go bench");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client-go bench failed: {}{report}", String::from_utf8_lossy(&out.stderr));
    let mut rounds: Vec<[(f64, f64); 2]> = vec![[(0.0, 0.0); 2]; ROUNDS];
    for line in report.lines() {
        let field = |name: &str| {
            line.split(' ').find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('='))).unwrap_or_default()
        };
        let round: usize = field("round").parse().unwrap();
        let slot = usize::from(field("encoding") == "json");
        rounds[round][slot] = (field("list_ms").parse().unwrap(), field("watch_ms").parse().unwrap());
    }
    println!(
        "{:<8} {:>14} {:>14} {:>14} {:>14}",
        "round", "list pb ms", "list json ms", "watch pb ms", "watch json ms"
    );
    for (i, [(lp, wp), (lj, wj)]) in rounds.iter().enumerate() {
        println!("{i:<8} {lp:>14.1} {lj:>14.1} {wp:>14.1} {wj:>14.1}");
    }
    // Round 0 encodes each pod once into the cache; the steady state is what follows.
    let steady = &rounds[1..];
    let list_ratio = median(steady.iter().map(|[(lp, _), (lj, _)]| lj / lp).collect());
    let watch_ratio = median(steady.iter().map(|[(_, wp), (_, wj)]| wj / wp).collect());
    let pods_per_s = |ms: f64| n as f64 / (ms / 1e3);
    let list_pb = median(steady.iter().map(|r| r[0].0).collect());
    let watch_pb = median(steady.iter().map(|r| r[0].1).collect());
    println!(
        "list:  protobuf {:.0} pods/s, {list_ratio:.2}x JSON's throughput (median of rounds 1-{})",
        pods_per_s(list_pb),
        ROUNDS - 1
    );
    println!("watch: protobuf {:.0} pods/s, {watch_ratio:.2}x JSON's throughput", pods_per_s(watch_pb));

    // The same list read raw: what the server sends and how long it takes to send it.
    let mut sizes = (0, 0);
    let mut ratios = Vec::new();
    for _ in 0..ROUNDS {
        let (pb_bytes, pb_time) = raw_list(&server.client, PROTOBUF).await;
        let (json_bytes, json_time) = raw_list(&server.client, "application/json").await;
        sizes = (pb_bytes, json_bytes);
        ratios.push(json_time.as_secs_f64() / pb_time.as_secs_f64());
    }
    println!(
        "raw list: protobuf {} bytes, JSON {} bytes ({:.2}x smaller); served in {:.2}x JSON's time",
        sizes.0,
        sizes.1,
        sizes.1 as f64 / sizes.0 as f64,
        1.0 / median(ratios)
    );
}
