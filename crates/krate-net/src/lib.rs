//! Networking, node and cluster: address ranges (`Cidr`), the pod network of a node
//! (`pod`: bridge, per-pod veths through the CNI plugins, egress masquerade in nftables),
//! routes to the other nodes' pods (`routes`: host-gw or VXLAN, following the Nodes),
//! the service proxy (`proxy`: Services to endpoints in the same nftables table) and the
//! cluster DNS responder (`dns`), both fed by one `catalog` of Services and endpoints.
//! Every node agent runs them, so `krate server` alone is a complete single-node cluster.

pub mod catalog;
pub mod cidr;
pub mod dns;
pub mod pod;
pub mod proxy;
pub mod routes;

pub use cidr::Cidr;
pub use pod::PodNetwork;
