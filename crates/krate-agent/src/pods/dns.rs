//! Name resolution inside pods, as the kubelet sets it up: the resolv.conf the runtime
//! writes from the sandbox's DNS config (per `dnsPolicy`, merged with `dnsConfig`, within
//! upstream's limits), and the managed `/etc/hosts` mounted into every container (the
//! pod's own name and address, `hostname.subdomain`, and `hostAliases`).

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Container, Pod};

use crate::cri::api;

/// Upstream's limits on what a resolv.conf may hold.
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCHES: usize = 32;
const MAX_SEARCH_CHARS: usize = 2048;

/// A resolv.conf's servers, search list and options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    /// As the kubelet reads one: `nameserver` lines add up, the last `search` and
    /// `options` lines win.
    pub fn parse(text: &str) -> Self {
        let mut conf = ResolvConf::default();
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.starts_with(';')) {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => conf.servers.extend(words.next().map(str::to_string)),
                Some("search") => conf.searches = words.map(|w| w.trim_end_matches('.').to_string()).collect(),
                Some("options") => conf.options = words.map(str::to_string).collect(),
                _ => {}
            }
        }
        conf
    }
}

/// The node's DNS settings for its pods.
#[derive(Clone, Debug)]
pub struct PodDns {
    /// The cluster DNS address (`kube-dns`); None: ClusterFirst falls back to Default.
    pub cluster_dns: Option<IpAddr>,
    /// `cluster.local`.
    pub domain: String,
    /// The node's own resolv.conf.
    pub host: ResolvConf,
}

fn dedup(items: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

impl PodDns {
    /// The sandbox's DNS configuration for `pod`.
    pub fn config(&self, pod: &Pod) -> api::DnsConfig {
        let spec = pod.spec.clone().unwrap_or_default();
        let host_network = spec.host_network.unwrap_or(false);
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
        let cluster = match policy {
            "None" => None,
            "Default" => Some(false),
            "ClusterFirstWithHostNet" => Some(true),
            _ => Some(!host_network),
        };
        let mut conf = match (cluster, self.cluster_dns) {
            (None, _) => ResolvConf::default(),
            (Some(true), Some(dns)) => {
                let d = &self.domain;
                let mut searches = vec![format!("{namespace}.svc.{d}"), format!("svc.{d}"), d.clone()];
                searches.extend(self.host.searches.iter().cloned());
                ResolvConf {
                    servers: vec![dns.to_string()],
                    searches: dedup(searches),
                    options: vec!["ndots:5".into()],
                }
            }
            (Some(_), _) => self.host.clone(),
        };
        if let Some(extra) = &spec.dns_config {
            conf.servers.extend(extra.nameservers.iter().flatten().cloned());
            conf.servers = dedup(std::mem::take(&mut conf.servers));
            conf.searches.extend(extra.searches.iter().flatten().cloned());
            conf.searches = dedup(std::mem::take(&mut conf.searches));
            for option in extra.options.iter().flatten() {
                let rendered = match &option.value {
                    Some(v) => format!("{}:{v}", option.name.clone().unwrap_or_default()),
                    None => option.name.clone().unwrap_or_default(),
                };
                let name = option.name.clone().unwrap_or_default();
                conf.options.retain(|o| o.split(':').next() != Some(name.as_str()));
                conf.options.push(rendered);
            }
        }
        conf.servers.truncate(MAX_NAMESERVERS);
        conf.searches.truncate(MAX_SEARCHES);
        conf.searches.retain(|s| s.len() <= 253);
        while conf.searches.join(" ").len() > MAX_SEARCH_CHARS {
            conf.searches.pop();
        }
        api::DnsConfig { servers: conf.servers, searches: conf.searches, options: conf.options }
    }
}

/// The pod's hostname and, with a subdomain, its domain (upstream's
/// GeneratePodHostNameAndDomain).
pub fn host_and_domain(pod: &Pod, cluster_domain: &str) -> (String, Option<String>) {
    let spec = pod.spec.as_ref();
    let name = spec
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
    let mut host: String = name.chars().take(63).collect();
    while host.ends_with(['-', '.']) {
        host.pop();
    }
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let domain = spec
        .and_then(|s| s.subdomain.clone())
        .filter(|s| !s.is_empty())
        .map(|sub| format!("{sub}.{namespace}.svc.{cluster_domain}"));
    (host, domain)
}

/// The managed hosts file of a pod with address `pod_ip`.
pub fn hosts_file(pod: &Pod, pod_ip: &str, cluster_domain: &str, node_hosts: Option<&str>) -> String {
    let mut out = String::new();
    match node_hosts {
        Some(node) => {
            out.push_str("# Kubernetes-managed hosts file (host network).\n");
            out.push_str(node);
            if !node.ends_with('\n') {
                out.push('\n');
            }
        }
        None => {
            out.push_str("# Kubernetes-managed hosts file.\n");
            out.push_str("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n");
            let (host, domain) = host_and_domain(pod, cluster_domain);
            match domain {
                Some(d) => out.push_str(&format!("{pod_ip}\t{host}.{d}\t{host}\n")),
                None => out.push_str(&format!("{pod_ip}\t{host}\n")),
            }
        }
    }
    let aliases = pod.spec.as_ref().and_then(|s| s.host_aliases.clone()).unwrap_or_default();
    if !aliases.is_empty() {
        out.push_str("\n# Entries added by HostAliases.\n");
        for alias in aliases {
            let names = alias.hostnames.unwrap_or_default().join("\t");
            out.push_str(&format!("{}\t{names}\n", alias.ip));
        }
    }
    out
}

/// Writes the pod's hosts file under `pod_dir` and the mount for `container`; none when
/// the container mounts something at /etc/hosts itself, or the pod has no address yet.
pub fn hosts_mount(
    pod_dir: &Path,
    pod: &Pod,
    container: &Container,
    pod_ip: &str,
    cluster_domain: &str,
) -> Result<Option<api::Mount>> {
    let own = container.volume_mounts.iter().flatten().any(|m| m.mount_path == "/etc/hosts");
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    if own || (pod_ip.is_empty() && !host_network) {
        return Ok(None);
    }
    let node_hosts = if host_network { Some(std::fs::read_to_string("/etc/hosts").unwrap_or_default()) } else { None };
    let path = pod_dir.join("etc-hosts");
    std::fs::create_dir_all(pod_dir).with_context(|| format!("creating {}", pod_dir.display()))?;
    std::fs::write(&path, hosts_file(pod, pod_ip, cluster_domain, node_hosts.as_deref()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(api::Mount {
        container_path: "/etc/hosts".into(),
        host_path: path.display().to_string(),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "web-0", "namespace": "shop"}, "spec": spec})).unwrap()
    }

    fn dns() -> PodDns {
        PodDns {
            cluster_dns: Some("10.43.0.10".parse().unwrap()),
            domain: "cluster.local".into(),
            host: ResolvConf::parse("nameserver 192.0.2.53\nsearch example.com.\noptions ndots:2 edns0\n"),
        }
    }

    #[test]
    fn cluster_first_searches_the_namespace_then_the_host_list() {
        let c = dns().config(&pod(json!({"containers": []})));
        assert_eq!(c.servers, ["10.43.0.10"]);
        assert_eq!(c.searches, ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local", "example.com"]);
        assert_eq!(c.options, ["ndots:5"]);
    }

    #[test]
    fn host_network_and_default_use_the_nodes_resolver_and_none_only_dns_config() {
        let host = dns().config(&pod(json!({"containers": [], "hostNetwork": true})));
        assert_eq!(host.servers, ["192.0.2.53"]);
        let with_net =
            dns().config(&pod(json!({"containers": [], "hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"})));
        assert_eq!(with_net.servers, ["10.43.0.10"]);
        let default = dns().config(&pod(json!({"containers": [], "dnsPolicy": "Default"})));
        assert_eq!(
            (default.searches, default.options),
            (vec!["example.com".to_string()], vec!["ndots:2".to_string(), "edns0".to_string()])
        );
        let none = dns().config(&pod(json!({"containers": [], "dnsPolicy": "None", "dnsConfig": {
            "nameservers": ["1.2.3.4"], "searches": ["a.example"], "options": [{"name": "ndots", "value": "1"}, {"name": "rotate"}]}})));
        assert_eq!(none.servers, ["1.2.3.4"]);
        assert_eq!(none.searches, ["a.example"]);
        assert_eq!(none.options, ["ndots:1", "rotate"]);
    }

    #[test]
    fn dns_config_options_override_by_name_and_limits_hold() {
        let servers: Vec<String> = (1..=5).map(|i| format!("10.0.0.{i}")).collect();
        let c = dns().config(&pod(json!({"containers": [], "dnsConfig": {"nameservers": servers, "options": [{"name": "ndots", "value": "2"}]}})));
        assert_eq!(c.servers.len(), 3, "{:?}", c.servers);
        assert_eq!(c.options, ["ndots:2"]);
    }

    #[test]
    fn hosts_files_name_the_pod_its_subdomain_and_aliases() {
        let p = pod(json!({"containers": [], "hostname": "web-0", "subdomain": "web",
            "hostAliases": [{"ip": "192.0.2.7", "hostnames": ["foo.local", "bar.local"]}]}));
        let hosts = hosts_file(&p, "10.42.0.7", "cluster.local", None);
        assert!(hosts.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.contains("10.42.0.7\tweb-0.web.shop.svc.cluster.local\tweb-0\n"), "{hosts}");
        assert!(hosts.ends_with("\n# Entries added by HostAliases.\n192.0.2.7\tfoo.local\tbar.local\n"), "{hosts}");
        let plain = hosts_file(&pod(json!({"containers": []})), "10.42.0.8", "cluster.local", None);
        assert!(plain.ends_with("fe00::2\tip6-allrouters\n10.42.0.8\tweb-0\n"), "{plain}");
    }
}
