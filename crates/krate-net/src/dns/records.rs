//! The cluster zone's records, built from Services and EndpointSlices as the Kubernetes
//! DNS specification (schema 1.1.0) lays them out, and the answer to one question:
//! - `<svc>.<ns>.svc.<zone>`: A/AAAA of a ClusterIP Service, or of each ready endpoint of
//!   a headless one; CNAME of an ExternalName Service.
//! - `<host>.<svc>.<ns>.svc.<zone>`: each ready endpoint of a headless Service, by its
//!   hostname (StatefulSet pods: `web-0.web`) or its dashed address.
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV for named ports.
//! - PTR for ClusterIPs and for headless endpoints with a hostname.
//! - `<a-b-c-d>.<ns>.pod.<zone>`: any address (upstream's `pods insecure`).
//! - `dns-version.<zone>`: TXT "1.1.0".
//!
//! A name that exists without records of the asked type answers NODATA (NOERROR, no
//! answers, the zone's SOA); a name in the zone that does not exist NXDOMAIN. Names
//! outside the zone (and reverse names it does not know) are for the upstream resolvers.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::catalog::Key;

/// The records of one name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub addresses: Vec<IpAddr>,
    pub cname: Option<String>,
    /// (port, target)
    pub srv: Vec<(u16, String)>,
    pub ptr: Vec<String>,
}

/// What a question gets from the zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The name's records (possibly none of the asked type: NODATA).
    Found(Entry),
    /// In the zone, but no such name.
    NxDomain,
    /// Not the zone's to answer.
    Forward,
}

/// The zone's names, kept per Service so that a change replaces only its names.
#[derive(Default)]
pub struct Index {
    /// Lower-case absolute name (`web.default.svc.cluster.local.`) → entries by Service.
    names: HashMap<String, Vec<(Key, Entry)>>,
    by_service: HashMap<Key, Vec<String>>,
    /// Services per namespace: `<ns>.svc.<zone>` exists while it has one.
    namespaces: HashMap<String, usize>,
    /// Moves with every change (answers cached under it).
    pub generation: u64,
}

/// The reverse-lookup name of an address (`5.0.43.10.in-addr.arpa.`).
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for byte in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            s + "ip6.arpa."
        }
    }
}

/// An endpoint's name label: its hostname, or its address with dashes.
fn endpoint_label(hostname: Option<&str>, ip: IpAddr) -> String {
    match hostname.filter(|h| !h.is_empty()) {
        Some(h) => h.to_lowercase(),
        None => ip.to_string().replace(['.', ':'], "-"),
    }
}

impl Index {
    /// Replaces the names of Service `key` (None: it is gone).
    pub fn update(&mut self, key: &Key, svc: Option<&Service>, slices: &[&EndpointSlice], zone: &str) {
        self.generation += 1;
        for name in self.by_service.remove(key).unwrap_or_default() {
            if let Some(entries) = self.names.get_mut(&name) {
                entries.retain(|(k, _)| k != key);
                if entries.is_empty() {
                    self.names.remove(&name);
                }
            }
        }
        if self.namespaces.contains_key(&key.0) {
            let count = self.namespaces.get_mut(&key.0).expect("present");
            *count -= 1;
            if *count == 0 {
                self.namespaces.remove(&key.0);
            }
        }
        let Some(svc) = svc else { return };
        *self.namespaces.entry(key.0.clone()).or_default() += 1;
        let mut names: HashMap<String, Entry> = HashMap::new();
        let fqdn = format!("{}.{}.svc.{zone}", key.1, key.0).to_lowercase();
        let spec = svc.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            if let Some(target) = spec.external_name.filter(|n| !n.is_empty()) {
                let target = if target.ends_with('.') { target } else { format!("{target}.") };
                names.entry(fqdn.clone()).or_default().cname = Some(target.to_lowercase());
            }
        } else {
            let cluster_ips: Vec<IpAddr> = spec.cluster_ips.iter().flatten().filter_map(|ip| ip.parse().ok()).collect();
            let named_ports: Vec<(String, String, u16)> = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    let name = p.name.clone().filter(|n| !n.is_empty())?;
                    let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into()).to_lowercase();
                    Some((name, proto, u16::try_from(p.port).ok()?))
                })
                .collect();
            if !cluster_ips.is_empty() {
                names.entry(fqdn.clone()).or_default().addresses = cluster_ips.clone();
                for (name, proto, port) in &named_ports {
                    names.entry(format!("_{name}._{proto}.{fqdn}")).or_default().srv.push((*port, fqdn.clone()));
                }
                for ip in &cluster_ips {
                    names.entry(reverse_name(*ip)).or_default().ptr.push(fqdn.clone());
                }
            } else {
                // Headless: each ready endpoint.
                for slice in slices {
                    for e in slice.endpoints.iter().flatten() {
                        if !e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true) {
                            continue;
                        }
                        let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
                        let host = format!("{}.{fqdn}", endpoint_label(e.hostname.as_deref(), ip));
                        let entry = names.entry(fqdn.clone()).or_default();
                        if !entry.addresses.contains(&ip) {
                            entry.addresses.push(ip);
                        }
                        let host_entry = names.entry(host.clone()).or_default();
                        if !host_entry.addresses.contains(&ip) {
                            host_entry.addresses.push(ip);
                        }
                        if e.hostname.as_deref().is_some_and(|h| !h.is_empty()) {
                            names.entry(reverse_name(ip)).or_default().ptr.push(host.clone());
                        }
                        for (name, proto, _) in &named_ports {
                            let port = slice
                                .ports
                                .iter()
                                .flatten()
                                .find(|p| p.name.as_deref() == Some(name.as_str()))
                                .and_then(|p| p.port)
                                .and_then(|p| u16::try_from(p).ok());
                            if let Some(port) = port {
                                let srv = &mut names.entry(format!("_{name}._{proto}.{fqdn}")).or_default().srv;
                                if !srv.contains(&(port, host.clone())) {
                                    srv.push((port, host.clone()));
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut contributed = Vec::new();
        for (name, mut entry) in names {
            entry.addresses.sort();
            entry.srv.sort();
            entry.ptr.sort();
            self.names.entry(name.clone()).or_default().push((key.clone(), entry));
            contributed.push(name);
        }
        self.by_service.insert(key.clone(), contributed);
    }

    /// The zone's answer for `name` (lower-case, absolute).
    pub fn lookup(&self, name: &str, zone: &str) -> Lookup {
        if let Some(entries) = self.names.get(name) {
            let mut merged = Entry::default();
            for (_, e) in entries {
                merged.addresses.extend(&e.addresses);
                merged.srv.extend(e.srv.iter().cloned());
                merged.ptr.extend(e.ptr.iter().cloned());
                if merged.cname.is_none() {
                    merged.cname.clone_from(&e.cname);
                }
            }
            return Lookup::Found(merged);
        }
        let Some(inside) = name.strip_suffix(zone).filter(|rest| rest.is_empty() || rest.ends_with('.')) else {
            return Lookup::Forward;
        };
        let labels: Vec<&str> = inside.trim_end_matches('.').split('.').filter(|l| !l.is_empty()).collect();
        match labels.as_slice() {
            // The apex and its two subdomains exist, with nothing but the SOA.
            [] | ["svc"] | ["pod"] => Lookup::Found(Entry::default()),
            ["dns-version"] => Lookup::Found(Entry::default()),
            [ns, "svc"] if self.namespaces.contains_key(*ns) => Lookup::Found(Entry::default()),
            [address, _, "pod"] => match pod_address(address) {
                Some(ip) => Lookup::Found(Entry { addresses: vec![ip], ..Default::default() }),
                None => Lookup::NxDomain,
            },
            _ => Lookup::NxDomain,
        }
    }
}

/// `10-42-0-5` → 10.42.0.5; `fd00--5` → fd00::5.
fn pod_address(label: &str) -> Option<IpAddr> {
    if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label.replace('-', ":").parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ZONE: &str = "cluster.local.";

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.into(), name.into())
    }

    fn found(index: &Index, name: &str) -> Entry {
        match index.lookup(name, ZONE) {
            Lookup::Found(e) => e,
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn cluster_ip_services_have_addresses_srv_and_ptr() {
        let mut index = Index::default();
        let web = svc(json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.43.0.5", "clusterIPs": ["10.43.0.5"], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}));
        index.update(&key("default", "web"), Some(&web), &[], ZONE);
        let entry = found(&index, "web.default.svc.cluster.local.");
        assert_eq!(entry.addresses, ["10.43.0.5".parse::<IpAddr>().unwrap()]);
        let srv = found(&index, "_http._tcp.web.default.svc.cluster.local.");
        assert_eq!(srv.srv, [(80, "web.default.svc.cluster.local.".to_string())]);
        assert_eq!(found(&index, "5.0.43.10.in-addr.arpa.").ptr, ["web.default.svc.cluster.local."]);
        assert_eq!(index.lookup("nope.default.svc.cluster.local.", ZONE), Lookup::NxDomain);
        assert_eq!(found(&index, "default.svc.cluster.local."), Entry::default(), "a namespace with services: NODATA");
        assert_eq!(index.lookup("empty.svc.cluster.local.", ZONE), Lookup::NxDomain);
        assert_eq!(index.lookup("example.com.", ZONE), Lookup::Forward);
        index.update(&key("default", "web"), None, &[], ZONE);
        assert_eq!(index.lookup("web.default.svc.cluster.local.", ZONE), Lookup::NxDomain);
        assert_eq!(index.lookup("5.0.43.10.in-addr.arpa.", ZONE), Lookup::Forward);
    }

    #[test]
    fn headless_services_name_their_ready_endpoints() {
        let mut index = Index::default();
        let web = svc(json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"name": "http", "port": 80}]}}));
        let endpoints = slice(
            json!({"metadata": {"name": "web-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.42.0.7"], "hostname": "web-0", "conditions": {"ready": true}},
                {"addresses": ["10.42.0.8"], "conditions": {"ready": true}},
                {"addresses": ["10.42.0.9"], "hostname": "web-2", "conditions": {"ready": false}},
            ]}),
        );
        index.update(&key("default", "web"), Some(&web), &[&endpoints], ZONE);
        let all = found(&index, "web.default.svc.cluster.local.");
        assert_eq!(all.addresses.len(), 2, "ready ones only: {all:?}");
        assert_eq!(
            found(&index, "web-0.web.default.svc.cluster.local.").addresses,
            ["10.42.0.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(found(&index, "10-42-0-8.web.default.svc.cluster.local.").addresses.len(), 1);
        assert_eq!(index.lookup("web-2.web.default.svc.cluster.local.", ZONE), Lookup::NxDomain);
        let srv = found(&index, "_http._tcp.web.default.svc.cluster.local.").srv;
        assert!(srv.contains(&(8080, "web-0.web.default.svc.cluster.local.".to_string())), "{srv:?}");
        assert_eq!(found(&index, "7.0.42.10.in-addr.arpa.").ptr, ["web-0.web.default.svc.cluster.local."]);
    }

    #[test]
    fn external_names_pods_and_the_apex() {
        let mut index = Index::default();
        let ext = svc(
            json!({"metadata": {"name": "ext", "namespace": "default"}, "spec": {"type": "ExternalName", "externalName": "Example.COM"}}),
        );
        index.update(&key("default", "ext"), Some(&ext), &[], ZONE);
        assert_eq!(found(&index, "ext.default.svc.cluster.local.").cname.as_deref(), Some("example.com."));
        assert_eq!(
            found(&index, "10-42-0-5.default.pod.cluster.local.").addresses,
            ["10.42.0.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(index.lookup("not-an-ip.default.pod.cluster.local.", ZONE), Lookup::NxDomain);
        assert_eq!(found(&index, "cluster.local."), Entry::default());
        assert_eq!(found(&index, "svc.cluster.local."), Entry::default());
        assert_eq!(reverse_name("fd00::1".parse().unwrap()).len(), "x.".len() * 32 + "ip6.arpa.".len());
    }
}
