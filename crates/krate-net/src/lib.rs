//! Networking, node and cluster: address ranges (`Cidr`) and the pod network of a node
//! (`pod`: bridge, per-pod veths through the CNI plugins, egress masquerade in nftables).
//! The service proxy and cluster DNS will live here too, so that every node agent runs
//! them and `krate server` alone stays a complete single-node cluster.

pub mod cidr;
pub mod pod;

pub use cidr::Cidr;
pub use pod::PodNetwork;
