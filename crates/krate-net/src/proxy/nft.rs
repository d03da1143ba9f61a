//! The proxy's part of the node's nftables table, written as `nft -f` transactions:
//! each one is applied whole or not at all, so a failure never leaves half a change.
//! A full sync (at start, and after a failure) rewrites everything in one transaction
//! without deleting the table, so connections in flight keep their NAT; a partial sync
//! rewrites only the shares of the services that changed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};

use super::rules::{Map, Share, MASQUERADE_MARK};

/// Chains with hooks: (name, type, hook, priority). Priorities are numbers (dstnat is
/// -100, srcnat 100, filter 0): older nft takes the names only on some hooks.
const HOOKS: &[(&str, &str, &str, &str)] = &[
    ("nat-prerouting", "nat", "prerouting", "-100"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "100"),
    ("filter-prerouting-pre-dnat", "filter", "prerouting", "-110"),
    ("filter-output-pre-dnat", "filter", "output", "-110"),
    ("filter-forward", "filter", "forward", "0"),
    ("filter-input", "filter", "input", "0"),
    ("filter-output", "filter", "output", "0"),
];

/// Chains without hooks that the base rules use.
const HELPERS: &[&str] = &[
    "services",
    "hostports",
    "masquerading",
    "mark-for-masquerade",
    "service-endpoints-check",
    "nodeport-endpoints-check",
    "firewall-check",
    "cluster-ips-check",
    "reject-chain",
];

/// Name prefixes of the chains and sets a share may own.
const SHARE_PREFIXES: &[&str] =
    &["service-", "local-", "external-", "endpoint-", "firewall-", "affinity-", "hostport-"];

/// What the base rules depend on.
#[derive(Clone, Debug)]
pub struct Base {
    pub table: String,
    /// The pod bridge: DNAT to a loopback endpoint (the API server on 127.0.0.1) is let
    /// in from it, nothing else to loopback.
    pub bridge: String,
    /// Addresses that accept node port traffic.
    pub node_ips: Vec<Ipv4Addr>,
    /// The service ranges: a new connection to an address of theirs that no rule
    /// translated (no such Service, or not yet programmed) is dropped rather than routed
    /// out of the node.
    pub service_cidrs: Vec<crate::Cidr>,
}

impl Base {
    fn unallocated_drop(&self) -> Vec<String> {
        let v4: Vec<String> = self.service_cidrs.iter().filter(|c| c.is_ipv4()).map(|c| c.to_string()).collect();
        if v4.is_empty() {
            return vec![];
        }
        vec![format!("ip daddr {{ {} }} drop", v4.join(", "))]
    }

    fn rules(&self) -> Vec<(&'static str, Vec<String>)> {
        let bridge = &self.bridge;
        vec![
            ("nat-prerouting", vec!["jump hostports".into(), "jump services".into()]),
            ("nat-output", vec!["jump hostports".into(), "jump services".into()]),
            (
                "hostports",
                vec![
                    "ip daddr . meta l4proto . th dport vmap @host-ip-ports".into(),
                    // A cheap lookup for every new connection; the host port's chain checks
                    // the address is the node's (a route lookup) only for its own port.
                    "meta l4proto . th dport vmap @host-ports".into(),
                ],
            ),
            ("nat-postrouting", vec!["jump masquerading".into()]),
            ("filter-prerouting-pre-dnat", vec!["ct state new jump firewall-check".into()]),
            ("filter-output-pre-dnat", vec!["ct state new jump firewall-check".into()]),
            (
                "filter-forward",
                vec!["ct state new jump service-endpoints-check".into(), "ct state new jump cluster-ips-check".into()],
            ),
            (
                "filter-input",
                vec![
                    format!("iifname \"{bridge}\" ip daddr 127.0.0.0/8 ct status & dnat == 0 drop"),
                    "ct state new jump nodeport-endpoints-check".into(),
                    "ct state new jump service-endpoints-check".into(),
                ],
            ),
            (
                "filter-output",
                vec!["ct state new jump service-endpoints-check".into(), "ct state new jump cluster-ips-check".into()],
            ),
            (
                "services",
                vec![
                    "ip daddr . meta l4proto . th dport vmap @service-ips".into(),
                    "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".into(),
                ],
            ),
            (
                "masquerading",
                vec![
                    format!("mark and {MASQUERADE_MARK} == 0 return"),
                    format!("mark set mark xor {MASQUERADE_MARK}"),
                    "masquerade fully-random".into(),
                ],
            ),
            ("mark-for-masquerade", vec![format!("mark set mark or {MASQUERADE_MARK}")]),
            ("service-endpoints-check", vec!["ip daddr . meta l4proto . th dport vmap @no-endpoint-services".into()]),
            (
                "nodeport-endpoints-check",
                vec!["ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports".into()],
            ),
            ("firewall-check", vec!["ip daddr . meta l4proto . th dport vmap @firewall-ips".into()]),
            ("cluster-ips-check", self.unallocated_drop()),
            ("reject-chain", vec!["reject".into()]),
        ]
    }
}

/// A transaction being written.
pub struct Tx {
    table: String,
    text: String,
}

impl Tx {
    pub fn new(table: &str) -> Self {
        Self { table: table.to_string(), text: String::new() }
    }

    fn line(&mut self, line: std::fmt::Arguments) {
        let _ = self.text.write_fmt(line);
        self.text.push('\n');
    }

    fn chain_rules(&mut self, chain: &str, rules: &[String]) {
        let t = &self.table;
        let text = &mut self.text;
        let _ = writeln!(text, "flush chain ip {t} {chain}");
        for rule in rules {
            let _ = writeln!(text, "add rule ip {t} {chain} {rule}");
        }
    }

    /// The table, hooks, helper chains, maps and sets, and their rules.
    pub fn base(&mut self, base: &Base) {
        let t = self.table.clone();
        self.line(format_args!("add table ip {t}"));
        for (name, kind, hook, priority) in HOOKS {
            self.line(format_args!(
                "add chain ip {t} {name} {{ type {kind} hook {hook} priority {priority}; policy accept; }}"
            ));
        }
        for name in HELPERS {
            self.line(format_args!("add chain ip {t} {name}"));
        }
        self.line(format_args!("add set ip {t} nodeport-ips {{ type ipv4_addr; }}"));
        for map in Map::ALL {
            self.line(format_args!("add map ip {t} {} {{ type {} : verdict; }}", map.name(), map.key_type()));
        }
        for (chain, rules) in base.rules() {
            self.chain_rules(chain, &rules);
        }
        self.line(format_args!("flush set ip {t} nodeport-ips"));
        if !base.node_ips.is_empty() {
            let ips: Vec<String> = base.node_ips.iter().map(|ip| ip.to_string()).collect();
            self.line(format_args!("add element ip {t} nodeport-ips {{ {} }}", ips.join(", ")));
        }
    }

    /// Replaces every share: `existing` names the chains and sets the kernel holds now,
    /// which go unless wanted.
    pub fn full(&mut self, shares: &Share, existing: &Existing) {
        let t = self.table.clone();
        for (set, timeout) in &shares.affinity_sets {
            self.line(format_args!(
                "add set ip {t} {set} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}"
            ));
        }
        for chain in shares.chains.keys() {
            self.line(format_args!("add chain ip {t} {chain}"));
        }
        for chain in existing.chains.iter().filter(|c| !shares.chains.contains_key(*c)) {
            self.line(format_args!("flush chain ip {t} {chain}"));
        }
        for (chain, rules) in &shares.chains {
            self.chain_rules(chain, rules);
        }
        for map in Map::ALL {
            self.line(format_args!("flush map ip {t} {}", map.name()));
        }
        self.elements(shares.elements.iter(), true);
        for chain in existing.chains.iter().filter(|c| !shares.chains.contains_key(*c)) {
            self.line(format_args!("delete chain ip {t} {chain}"));
        }
        for set in existing.sets.iter().filter(|s| !shares.affinity_sets.contains_key(*s)) {
            self.line(format_args!("delete set ip {t} {set}"));
        }
    }

    fn elements<'a>(&mut self, elements: impl Iterator<Item = (&'a (Map, String), &'a String)>, add: bool) {
        let mut by_map: BTreeMap<Map, Vec<String>> = BTreeMap::new();
        for ((map, key), verdict) in elements {
            let element = if add { format!("{key} : {verdict}") } else { key.clone() };
            by_map.entry(*map).or_default().push(element);
        }
        let verb = if add { "add" } else { "delete" };
        let t = self.table.clone();
        for (map, elements) in by_map {
            self.line(format_args!("{verb} element ip {t} {} {{ {} }}", map.name(), elements.join(", ")));
        }
    }

    /// Changes the shares `old` into `new` (both the union over the changed services).
    pub fn partial(&mut self, old: &Share, new: &Share) {
        let t = self.table.clone();
        for (set, timeout) in new.affinity_sets.iter().filter(|(s, _)| !old.affinity_sets.contains_key(*s)) {
            self.line(format_args!(
                "add set ip {t} {set} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}"
            ));
        }
        for chain in new.chains.keys().filter(|c| !old.chains.contains_key(*c)) {
            self.line(format_args!("add chain ip {t} {chain}"));
        }
        for (chain, rules) in &new.chains {
            if old.chains.get(chain) != Some(rules) {
                self.chain_rules(chain, rules);
            }
        }
        let changed = |e: &&(Map, String), v: &String, other: &Share| other.elements.get(*e) != Some(v);
        self.elements(old.elements.iter().filter(|(e, v)| changed(e, v, new)), false);
        self.elements(new.elements.iter().filter(|(e, v)| changed(e, v, old)), true);
        let stale: Vec<&String> = old.chains.keys().filter(|c| !new.chains.contains_key(*c)).collect();
        for chain in &stale {
            self.line(format_args!("flush chain ip {t} {chain}"));
        }
        for chain in &stale {
            self.line(format_args!("delete chain ip {t} {chain}"));
        }
        for set in old.affinity_sets.keys().filter(|s| !new.affinity_sets.contains_key(*s)) {
            self.line(format_args!("delete set ip {t} {set}"));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

/// The share-owned chains and sets a table holds.
#[derive(Clone, Debug, Default)]
pub struct Existing {
    pub chains: BTreeSet<String>,
    pub sets: BTreeSet<String>,
}

/// Reads what the table holds (nothing, if it does not exist yet).
pub async fn existing(table: &str) -> Result<Existing> {
    let out = tokio::process::Command::new("nft")
        .args(["-j", "list", "table", "ip", table])
        .output()
        .await
        .context("running nft (apt-get install -y nftables)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(Existing::default());
        }
        bail!("nft list table ip {table}: {}", err.trim());
    }
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading nft's JSON listing")?;
    let mut found = Existing::default();
    let owned = |name: &str| SHARE_PREFIXES.iter().any(|p| name.starts_with(p)) && !HELPERS.contains(&name);
    for item in listing["nftables"].as_array().into_iter().flatten() {
        if let Some(name) = item.pointer("/chain/name").and_then(|n| n.as_str()).filter(|n| owned(n)) {
            found.chains.insert(name.to_string());
        }
        if let Some(name) = item.pointer("/set/name").and_then(|n| n.as_str()).filter(|n| owned(n)) {
            found.sets.insert(name.to_string());
        }
    }
    Ok(found)
}

/// Applies a transaction (`nft -f -`): all of it, or nothing.
pub async fn apply(tx: &Tx) -> Result<()> {
    crate::nft_apply(tx.text()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(chains: &[(&str, &[&str])], elements: &[(Map, &str, &str)]) -> Share {
        Share {
            chains: chains.iter().map(|(c, r)| (c.to_string(), r.iter().map(|r| r.to_string()).collect())).collect(),
            elements: elements.iter().map(|(m, k, v)| ((*m, k.to_string()), v.to_string())).collect(),
            affinity_sets: Default::default(),
        }
    }

    #[test]
    fn a_partial_sync_touches_only_what_changed() {
        let old = share(
            &[
                ("service-A", &["numgen random mod 1 vmap { 0 : goto endpoint-1 }"]),
                ("endpoint-1", &["dnat to 10.0.0.1:80"]),
            ],
            &[(Map::ServiceIps, "10.43.0.5 . tcp . 80", "goto service-A")],
        );
        let new = share(
            &[
                ("service-A", &["numgen random mod 1 vmap { 0 : goto endpoint-2 }"]),
                ("endpoint-2", &["dnat to 10.0.0.2:80"]),
            ],
            &[(Map::ServiceIps, "10.43.0.5 . tcp . 80", "goto service-A")],
        );
        let mut tx = Tx::new("t");
        tx.partial(&old, &new);
        let lines: Vec<&str> = tx.text().lines().collect();
        assert_eq!(
            lines,
            [
                "add chain ip t endpoint-2",
                "flush chain ip t endpoint-2",
                "add rule ip t endpoint-2 dnat to 10.0.0.2:80",
                "flush chain ip t service-A",
                "add rule ip t service-A numgen random mod 1 vmap { 0 : goto endpoint-2 }",
                "flush chain ip t endpoint-1",
                "delete chain ip t endpoint-1",
            ]
        );
        let mut same = Tx::new("t");
        same.partial(&new, &new);
        assert!(same.is_empty(), "{}", same.text());
    }

    #[test]
    fn changed_verdicts_are_deleted_then_added() {
        let old = share(&[], &[(Map::NoEndpointServices, "10.43.0.5 . tcp . 80", "goto reject-chain")]);
        let new = share(&[("service-A", &["x"])], &[(Map::ServiceIps, "10.43.0.5 . tcp . 80", "goto service-A")]);
        let mut tx = Tx::new("t");
        tx.partial(&old, &new);
        let text = tx.text();
        let delete = text.find("delete element ip t no-endpoint-services { 10.43.0.5 . tcp . 80 }").unwrap();
        let add = text.find("add element ip t service-ips { 10.43.0.5 . tcp . 80 : goto service-A }").unwrap();
        assert!(text.find("add chain ip t service-A").unwrap() < add && delete < add, "{text}");
    }
}
