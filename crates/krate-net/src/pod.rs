//! The pod network of one node: a Linux bridge with a veth per pod and addresses from the
//! node's podCIDR (Debian's CNI `bridge` + `host-local` plugins, configured here and run
//! by containerd), and egress masquerade in krate's own nftables table.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

/// An IPv4 CIDR such as `10.42.0.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Cidr> {
        let (ip, prefix) = s.split_once('/').with_context(|| format!("{s:?} is not a CIDR (like 10.42.0.0/24)"))?;
        let ip: Ipv4Addr = ip.parse().with_context(|| format!("{s:?}: {ip:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .with_context(|| format!("{s:?}: the prefix must be 8..30"))?;
        let mask = u32::MAX << (32 - prefix);
        Ok(Cidr { network: Ipv4Addr::from(u32::from(ip) & mask), prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// The first address, the bridge's (the pods' gateway).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }
}

/// The node's pod network.
#[derive(Clone, Debug)]
pub struct PodNetwork {
    pub bridge: String,
    pub pod_cidr: Cidr,
}

impl PodNetwork {
    /// The nftables table holding this network's rules (one per bridge).
    pub fn table(&self) -> String {
        format!("krate-{}", self.bridge)
    }

    /// The CNI configuration list containerd reads for every sandbox.
    pub fn cni_config(&self, ipam_dir: &Path) -> serde_json::Value {
        json!({
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
        })
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

    /// The nftables ruleset: pods reaching beyond the pod network leave with the node's
    /// address. Replaces the table whole, so running it again is harmless.
    fn ruleset(&self) -> String {
        let table = self.table();
        format!(
            "table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {cidr} ip daddr != {cidr} oifname != \"{bridge}\" masquerade\n  }}\n}}\n",
            cidr = self.pod_cidr,
            bridge = self.bridge,
        )
    }

    /// Installs the masquerade rules and turns on IPv4 forwarding.
    pub async fn install_rules(&self) -> Result<()> {
        nft(&self.ruleset()).await.context("installing the pod network's nftables rules")?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .context("enabling IPv4 forwarding (is the agent running as root?)")?;
        Ok(())
    }

    /// Removes the bridge and the nftables table (for `reset` and tests).
    pub async fn remove(&self) -> Result<()> {
        let table = self.table();
        nft(&format!("table ip {table} {{}}\ndelete table ip {table}\n")).await?;
        let out = tokio::process::Command::new("ip").args(["link", "delete", &self.bridge]).output().await?;
        if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("Cannot find device") {
            bail!("deleting bridge {}: {}", self.bridge, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

async fn nft(script: &str) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (apt-get install -y nftables)")?;
    child.stdin.take().context("nft stdin")?.write_all(script.as_bytes()).await?;
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_masks_and_rejects_bad_input() {
        let c: Cidr = "10.42.0.7/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.42.0.0/24");
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 42, 0, 1));
        assert!("10.42.0.0".parse::<Cidr>().is_err());
        assert!("10.42.0.0/31".parse::<Cidr>().is_err());
        assert!("fd00::/64".parse::<Cidr>().is_err());
    }

    #[test]
    fn masquerade_excludes_pod_to_pod_traffic() {
        let net = PodNetwork { bridge: "krate0".into(), pod_cidr: "10.42.0.0/24".parse().unwrap() };
        let rules = net.ruleset();
        assert!(
            rules.contains("ip saddr 10.42.0.0/24 ip daddr != 10.42.0.0/24 oifname != \"krate0\" masquerade"),
            "{rules}"
        );
        assert_eq!(net.cni_config(Path::new("/x"))["plugins"][0]["ipam"]["ranges"][0][0]["gateway"], "10.42.0.1");
    }
}
