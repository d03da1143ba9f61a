//! Networking, node and cluster: address ranges (`Cidr`), the pod network of a node
//! (`pod`: bridge, per-pod veths through the CNI plugins, egress masquerade in nftables),
//! routes to the other nodes' pods (`routes`: host-gw or VXLAN, following the Nodes),
//! NetworkPolicy for the node's pods (`policy`: nftables on the forward hook),
//! the service proxy (`proxy`: Services to endpoints in the same nftables table) and the
//! cluster DNS responder (`dns`), both fed by one `catalog` of Services and endpoints.
//! Every node agent runs them, so `krate server` alone is a complete single-node cluster.

pub mod catalog;
pub mod cidr;
pub mod dns;
pub mod pod;
pub mod policy;
pub mod proxy;
pub mod routes;
pub mod watch;

pub use cidr::Cidr;
pub use pod::PodNetwork;

/// Runs an nftables script (`nft -f -`) as one transaction: all of it, or nothing.
pub(crate) async fn nft_apply(script: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("running nft (apt-get install -y nftables)")?;
    child.stdin.take().context("nft stdin")?.write_all(script.as_bytes()).await?;
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!("nft refused the transaction: {}", err.lines().take(6).collect::<Vec<_>>().join(" | "));
    }
    Ok(())
}
