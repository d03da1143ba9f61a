//! Node IPAM (upstream's range allocator): every Node without `spec.podCIDR` gets the
//! first free subnet of the cluster CIDR (`/24` by default for IPv4, `/64` for IPv6) as
//! `spec.podCIDR` and `spec.podCIDRs`. What is free is read from the Nodes themselves,
//! so a CIDR is released with its Node and a restarted controller repairs nothing by
//! hand: the live Nodes are the allocation table. Nodes that came with a CIDR of their
//! own (an agent's `--pod-cidr`) keep it, and their CIDR counts as taken when it lies
//! in the cluster CIDR.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use krate_net::cidr::Cidr;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::json;

use crate::Error;

/// Where node CIDRs come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterCidr {
    pub cidr: Cidr,
    /// The prefix length of each node's CIDR.
    pub node_prefix: u8,
}

impl ClusterCidr {
    /// `cidr` split into node CIDRs of `node_prefix` bits (default /24, or /64 for IPv6).
    pub fn new(cidr: Cidr, node_prefix: Option<u8>) -> anyhow::Result<Self> {
        let node_prefix = node_prefix.unwrap_or(if cidr.is_ipv4() { 24 } else { 64 });
        let width = if cidr.is_ipv4() { 32 } else { 128 };
        if node_prefix < cidr.prefix || node_prefix > width {
            anyhow::bail!("a node CIDR of /{node_prefix} does not fit in the cluster CIDR {cidr}");
        }
        if node_prefix - cidr.prefix > 32 {
            anyhow::bail!("the cluster CIDR {cidr} holds more than 2^32 node CIDRs of /{node_prefix}; use a longer cluster prefix");
        }
        Ok(Self { cidr, node_prefix })
    }

    fn count(&self) -> u64 {
        1u64 << (self.node_prefix - self.cidr.prefix)
    }

    /// How many addresses a node CIDR holds.
    fn step(&self) -> u128 {
        1u128 << (u32::from(if self.cidr.is_ipv4() { 32 } else { 128u8 }) - u32::from(self.node_prefix))
    }

    /// The `n`th node CIDR.
    fn nth(&self, n: u64) -> Cidr {
        let first = self.cidr.nth(u128::from(n) * self.step()).expect("inside the cluster CIDR");
        Cidr::new(first, self.node_prefix)
    }

    /// The index of a node CIDR inside the cluster CIDR, if it is one of its subnets.
    fn index_of(&self, cidr: &Cidr) -> Option<u64> {
        if cidr.prefix < self.cidr.prefix || !self.cidr.contains(cidr.network) {
            return None;
        }
        Some((self.cidr.offset_of(cidr.network)? / self.step()) as u64)
    }

    /// The first node CIDR none of `taken` overlaps.
    pub fn first_free<'a>(&self, taken: impl Iterator<Item = &'a Cidr>) -> Option<Cidr> {
        let used: BTreeSet<u64> = taken.filter_map(|c| self.index_of(c)).collect();
        (0..self.count()).find(|i| !used.contains(i)).map(|i| self.nth(i))
    }
}

struct Context {
    client: kube::Client,
    range: ClusterCidr,
}

fn node_cidrs(node: &Node) -> Vec<Cidr> {
    let spec = node.spec.as_ref();
    let mut all: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    all.extend(spec.and_then(|s| s.pod_cidr.clone()));
    all.iter().filter_map(|c| c.parse().ok()).collect()
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, Error> {
    if node.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_some() || node.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // The table is read from the API, not the controller's cache: assignments are rare,
    // and a cache that is relisting (or has not yet shown the last assignment) would
    // hand out a CIDR a live Node holds.
    let api: Api<Node> = Api::all(ctx.client.clone());
    let taken: Vec<Cidr> = api.list(&Default::default()).await?.items.iter().flat_map(node_cidrs).collect();
    let Some(cidr) = ctx.range.first_free(taken.iter()) else {
        tracing::warn!(node = %node.name_any(), cluster_cidr = %ctx.range.cidr, "no pod CIDR left for a node (CIDRNotAvailable)");
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let patch = json!({"spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}});
    api.patch(&node.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    tracing::info!(node = %node.name_any(), pod_cidr = %cidr, "assigned a pod CIDR");
    Ok(Action::await_change())
}

fn error_policy(_: Arc<Node>, err: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "assigning a pod CIDR failed");
    Action::requeue(Duration::from_secs(2))
}

pub async fn run(client: kube::Client, range: ClusterCidr) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let controller = Controller::new(api, watcher::Config::default());
    let context = Arc::new(Context { client, range });
    // One node at a time, so that two never get the same CIDR from a stale store.
    controller
        .with_config(kube::runtime::controller::Config::default().concurrency(1))
        .run(reconcile, error_policy, context)
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_cidrs_are_the_first_free_subnets() {
        let range = ClusterCidr::new("10.42.0.0/16".parse().unwrap(), None).unwrap();
        let taken: Vec<Cidr> =
            ["10.42.0.0/24", "10.42.2.0/24", "192.168.0.0/24"].iter().map(|c| c.parse().unwrap()).collect();
        assert_eq!(range.first_free(taken.iter()).unwrap().to_string(), "10.42.1.0/24");
        assert_eq!(range.first_free([].iter()).unwrap().to_string(), "10.42.0.0/24");
        let v6 = ClusterCidr::new("fd00:42::/56".parse().unwrap(), None).unwrap();
        assert_eq!(v6.first_free([].iter()).unwrap().to_string(), "fd00:42::/64");
        let full = ClusterCidr::new("10.42.0.0/23".parse().unwrap(), None).unwrap();
        let both: Vec<Cidr> = ["10.42.0.0/24", "10.42.1.0/24"].iter().map(|c| c.parse().unwrap()).collect();
        assert_eq!(full.first_free(both.iter()), None);
        assert!(ClusterCidr::new("10.42.0.0/24".parse().unwrap(), Some(16)).is_err());
    }
}
