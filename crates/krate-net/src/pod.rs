//! The pod network of one node: a Linux bridge with a veth per pod and addresses from the
//! node's podCIDR (Debian's CNI `bridge` + `host-local` plugins, configured here and run
//! by containerd), and egress masquerade in krate's own nftables table.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::Cidr;

/// The node's pod network.
#[derive(Clone, Debug)]
pub struct PodNetwork {
    pub bridge: String,
    pub pod_cidr: Cidr,
    /// The pods' interface MTU (None: the plugin's default); below the link's when pod
    /// traffic may be encapsulated (`routes::pod_mtu`).
    pub mtu: Option<u32>,
}

impl PodNetwork {
    /// A node's pod range: IPv4 (the masquerade rules are), between /8 and /30.
    pub fn parse_cidr(s: &str) -> Result<Cidr> {
        let cidr: Cidr = s.parse()?;
        if !cidr.is_ipv4() || !(8..=30).contains(&cidr.prefix) {
            bail!("{s:?}: a pod network is an IPv4 range between /8 and /30");
        }
        Ok(cidr)
    }

    /// The nftables table holding this network's rules (one per bridge).
    pub fn table(&self) -> String {
        format!("krate-{}", self.bridge)
    }

    /// The nftables table of the NetworkPolicy rules for this network's pods.
    pub fn policy_table(&self) -> String {
        format!("krate-policy-{}", self.bridge)
    }

    /// The CNI configuration list containerd reads for every sandbox.
    pub fn cni_config(&self, ipam_dir: &Path) -> serde_json::Value {
        let mut config = json!({
            "cniVersion": "1.0.0",
            "name": "krate",
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "hairpinMode": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": self.pod_cidr.to_string(), "gateway": self.pod_cidr.gateway().to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir.display().to_string(),
                },
            }],
        });
        if let Some(mtu) = self.mtu {
            config["plugins"][0]["mtu"] = json!(mtu);
        }
        config
    }

    /// Writes the CNI configuration (the only file in `conf_dir`, so containerd picks it).
    pub fn write_cni_config(&self, conf_dir: &Path, ipam_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(conf_dir).with_context(|| format!("creating {}", conf_dir.display()))?;
        let path = conf_dir.join("10-krate.conflist");
        let tmp = conf_dir.join(".10-krate.conflist.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.cni_config(ipam_dir))?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The nftables rules: pods reaching beyond the cluster's pods (the `pod-cidrs` set:
    /// this node's range until `routes` adds every node's) leave with the node's address.
    /// Rewrites only its own chain and set, so running it again is harmless and leaves the
    /// service proxy's chains in the same table alone.
    fn ruleset(&self) -> String {
        let table = self.table();
        format!(
            "add table ip {table}\n\
             add set ip {table} {POD_CIDRS} {{ type ipv4_addr; flags interval; }}\n\
             flush set ip {table} {POD_CIDRS}\n\
             add element ip {table} {POD_CIDRS} {{ {cidr} }}\n\
             add chain ip {table} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             flush chain ip {table} postrouting\n\
             add rule ip {table} postrouting ip saddr {cidr} ip daddr != @{POD_CIDRS} oifname != \"{bridge}\" masquerade\n",
            cidr = self.pod_cidr,
            bridge = self.bridge,
        )
    }

    /// Installs the masquerade rules and turns on IPv4 forwarding.
    pub async fn install_rules(&self) -> Result<()> {
        crate::nft_apply(&self.ruleset()).await.context("installing the pod network's nftables rules")?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .context("enabling IPv4 forwarding (is the agent running as root?)")?;
        Ok(())
    }

    /// Creates the bridge with the pods' gateway address, if the CNI plugin has not yet
    /// (it finds them in place): the node's DNS responder listens on that address before
    /// the first pod starts. Bridged traffic passes netfilter, so replies of connections
    /// DNATed to a pod on the same bridge find their way back.
    pub async fn ensure_bridge(&self) -> Result<()> {
        let ip = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            async move { tokio::process::Command::new("ip").args(&args).output().await }
        };
        let exists = ip(&["link", "show", &self.bridge]).await?.status.success();
        if !exists {
            let out = ip(&["link", "add", &self.bridge, "type", "bridge"]).await?;
            if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("File exists") {
                bail!("creating bridge {}: {}", self.bridge, String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        let gateway = format!("{}/{}", self.pod_cidr.gateway(), self.pod_cidr.prefix);
        let out = ip(&["addr", "add", &gateway, "dev", &self.bridge]).await?;
        // A bridge left by an earlier run keeps its address ("File exists" from older
        // iproute2, "Address already assigned" from newer kernels).
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("File exists") && !stderr.contains("already assigned") {
            bail!("adding {gateway} to bridge {}: {}", self.bridge, String::from_utf8_lossy(&out.stderr).trim());
        }
        let out = ip(&["link", "set", &self.bridge, "up"]).await?;
        if !out.status.success() {
            bail!("bringing bridge {} up: {}", self.bridge, String::from_utf8_lossy(&out.stderr).trim());
        }
        if let Err(e) = std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "1") {
            tracing::warn!(error = %e, "cannot make bridged traffic pass netfilter (is br_netfilter loaded?); a pod reaching a Service whose endpoint shares its node may get no answer");
        }
        Ok(())
    }

    /// Removes the bridge and the nftables tables (for `reset` and tests).
    pub async fn remove(&self) -> Result<()> {
        for table in [self.table(), self.policy_table()] {
            crate::nft_apply(&format!("table ip {table} {{}}\ndelete table ip {table}\n")).await?;
        }
        let out = tokio::process::Command::new("ip").args(["link", "delete", &self.bridge]).output().await?;
        if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("Cannot find device") {
            bail!("deleting bridge {}: {}", self.bridge, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

/// The set of pod CIDRs masquerade leaves alone.
const POD_CIDRS: &str = "pod-cidrs";

/// Makes the `pod-cidrs` set of `table` exactly `cidrs` (one transaction).
pub(crate) async fn set_cluster_pod_cidrs(table: &str, cidrs: &std::collections::BTreeSet<String>) -> Result<()> {
    let mut script = format!("flush set ip {table} {POD_CIDRS}\n");
    if !cidrs.is_empty() {
        let list: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        script.push_str(&format!("add element ip {table} {POD_CIDRS} {{ {} }}\n", list.join(", ")));
    }
    crate::nft_apply(&script).await.context("updating the cluster's pod CIDRs in nftables")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ranges_are_ipv4_and_sized_for_a_bridge() {
        assert_eq!(PodNetwork::parse_cidr("10.42.0.7/24").unwrap().to_string(), "10.42.0.0/24");
        assert!(PodNetwork::parse_cidr("10.42.0.0/31").is_err());
        assert!(PodNetwork::parse_cidr("fd00::/64").is_err());
        assert!(PodNetwork::parse_cidr("10.42.0.0").is_err());
    }

    #[test]
    fn masquerade_excludes_pod_to_pod_traffic() {
        let mut net = PodNetwork { bridge: "krate0".into(), pod_cidr: "10.42.0.0/24".parse().unwrap(), mtu: None };
        let rules = net.ruleset();
        assert!(
            rules.contains("ip saddr 10.42.0.0/24 ip daddr != @pod-cidrs oifname != \"krate0\" masquerade"),
            "{rules}"
        );
        assert!(rules.contains("add element ip krate-krate0 pod-cidrs { 10.42.0.0/24 }"), "{rules}");
        let cni = net.cni_config(Path::new("/x"));
        assert_eq!(cni["plugins"][0]["ipam"]["ranges"][0][0]["gateway"], "10.42.0.1");
        assert!(cni["plugins"][0].get("mtu").is_none());
        net.mtu = Some(1450);
        assert_eq!(net.cni_config(Path::new("/x"))["plugins"][0]["mtu"], 1450);
    }
}
