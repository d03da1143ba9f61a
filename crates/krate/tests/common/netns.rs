//! Machines for control-plane tests: network namespaces on a bridge of their own, each
//! with one address (the host is `.1` on the bridge, so tests reach every machine), and
//! partitions between them made with nftables inside a machine's namespace. Everything
//! is removed on drop, whatever the test did.

use std::process::Command;

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

pub struct Lan {
    /// Tells this process's LANs apart (names, subnet).
    id: u32,
    bridge: String,
    namespaces: Vec<String>,
    /// The first three octets of the bridge's /24.
    prefix: String,
}

impl Lan {
    /// `count` machines on a /24 of 172.29 of their own (up to five LANs per test
    /// process at once).
    pub fn new(count: usize) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5;
        let id = std::process::id() % 50 * 5 + n;
        let prefix = format!("172.29.{id}");
        let mut lan = Lan { id, bridge: format!("kha{id}"), namespaces: Vec::new(), prefix };
        let host = format!("{}.1/24", lan.prefix);
        run(&["ip", "link", "add", &lan.bridge, "type", "bridge"]).expect("a bridge");
        run(&["ip", "addr", "add", &host, "dev", &lan.bridge]).unwrap();
        run(&["ip", "link", "set", &lan.bridge, "up"]).unwrap();
        for i in 0..count {
            let ns = format!("krate-ha-{id}-{i}");
            run(&["ip", "netns", "add", &ns]).expect("a network namespace");
            lan.namespaces.push(ns.clone());
            let (outer, inner) = (format!("kha{id}v{i}"), format!("kha{id}i{i}"));
            run(&["ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner]).unwrap();
            run(&["ip", "link", "set", &outer, "master", &lan.bridge, "up"]).unwrap();
            run(&["ip", "link", "set", &inner, "netns", &ns]).unwrap();
            let address = format!("{}/24", lan.ip(i));
            for args in [
                vec!["ip", "link", "set", "lo", "up"],
                vec!["ip", "addr", "add", &address, "dev", &inner],
                vec!["ip", "link", "set", &inner, "up"],
            ] {
                let mut all = vec!["ip", "netns", "exec", &ns];
                all.extend(args);
                run(&all).unwrap();
            }
        }
        lan
    }

    pub fn ns(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// Machine `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, i + 2)
    }

    /// Cuts machine `i` off from the other machines (not from the host, so the test can
    /// still talk to it).
    pub fn partition(&self, i: usize) {
        let others: Vec<String> = (0..self.namespaces.len()).filter(|j| *j != i).map(|j| self.ip(j)).collect();
        let set = others.join(", ");
        let rules = format!(
            "table inet krate_partition {{\n\
             chain input {{ type filter hook input priority -10; ip saddr {{ {set} }} drop; }}\n\
             chain output {{ type filter hook output priority -10; ip daddr {{ {set} }} drop; }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("krate-partition-{}.nft", self.id));
        std::fs::write(&file, rules).unwrap();
        run(&["ip", "netns", "exec", self.ns(i), "nft", "-f", file.to_str().unwrap()]).expect("the partition");
        let _ = std::fs::remove_file(file);
    }

    pub fn heal(&self, i: usize) {
        run(&["ip", "netns", "exec", self.ns(i), "nft", "delete", "table", "inet", "krate_partition"])
            .expect("healing");
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let id = self.id;
        for (i, ns) in self.namespaces.iter().enumerate() {
            let _ = run(&["ip", "netns", "del", ns]);
            // A namespace outlives its name while anything still holds it; its veth
            // must not.
            let _ = run(&["ip", "link", "del", &format!("kha{id}v{i}")]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
