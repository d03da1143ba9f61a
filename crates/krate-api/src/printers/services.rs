//! Services, Endpoints and EndpointSlices.

use serde_json::{json, Value};

use super::{age, first_three, int, map_string, name, or_none, s, string, Printer, AGE, NAME};
use crate::object::{get, get_str};

pub const SERVICES: Printer = Printer {
    columns: &[
        NAME,
        string("Type", 0),
        string("Cluster-IP", 0),
        string("External-IP", 0),
        string("Port(s)", 0),
        AGE,
        string("Selector", 1),
    ],
    cells: |obj| {
        vec![
            name(obj),
            json!(s(obj, &["spec", "type"])),
            json!(or_none(s(obj, &["spec", "clusterIP"]))),
            json!(service_external_ip(obj)),
            json!(service_ports(obj)),
            json!(age(obj)),
            json!(or_none(map_string(obj, "/spec/selector"))),
        ]
    },
};

fn service_ports(svc: &Value) -> String {
    let ports = get(svc, &["spec", "ports"]).and_then(Value::as_array).cloned().unwrap_or_default();
    let rendered: Vec<String> = ports
        .iter()
        .map(|p| {
            let node = int(p, &["nodePort"]);
            let proto = get_str(p, &["protocol"]).unwrap_or("TCP");
            if node > 0 {
                format!("{}:{node}/{proto}", int(p, &["port"]))
            } else {
                format!("{}/{proto}", int(p, &["port"]))
            }
        })
        .collect();
    or_none(rendered.join(","))
}

fn service_external_ip(svc: &Value) -> String {
    let external: Vec<String> = get(svc, &["spec", "externalIPs"])
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    match get_str(svc, &["spec", "type"]).unwrap_or("ClusterIP") {
        "ExternalName" => s(svc, &["spec", "externalName"]),
        "LoadBalancer" => {
            let ingress: Vec<String> = svc
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|i| get_str(i, &["ip"]).or(get_str(i, &["hostname"])).unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default();
            let all: Vec<String> = ingress.into_iter().chain(external).collect();
            if all.is_empty() {
                "<pending>".into()
            } else {
                all.join(",")
            }
        }
        _ => or_none(external.join(",")),
    }
}

pub const ENDPOINTS: Printer = Printer {
    columns: &[NAME, string("Endpoints", 0), AGE],
    cells: |obj| {
        let mut eps = Vec::new();
        for subset in obj.get("subsets").and_then(Value::as_array).into_iter().flatten() {
            let ports: Vec<i64> = subset
                .get("ports")
                .and_then(Value::as_array)
                .map(|p| p.iter().map(|p| int(p, &["port"])).collect())
                .unwrap_or_default();
            for addr in subset.get("addresses").and_then(Value::as_array).into_iter().flatten() {
                let ip = s(addr, &["ip"]);
                if ports.is_empty() {
                    eps.push(ip.clone())
                } else {
                    eps.extend(ports.iter().map(|p| format!("{ip}:{p}")))
                }
            }
        }
        vec![name(obj), json!(or_none(first_three(&eps))), json!(age(obj))]
    },
};

pub const ENDPOINT_SLICES: Printer = Printer {
    columns: &[NAME, string("AddressType", 0), string("Ports", 0), string("Endpoints", 0), AGE],
    cells: |obj| {
        let ports: Vec<String> = obj
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| int(p, &["port"]).to_string())
            .collect();
        let addresses: Vec<String> = obj
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|e| e.get("addresses").and_then(Value::as_array).cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(String::from))
            .collect();
        let unset = |v: String| if v.is_empty() { "<unset>".to_string() } else { v };
        vec![
            name(obj),
            json!(s(obj, &["addressType"])),
            json!(unset(ports.join(","))),
            json!(unset(first_three(&addresses))),
            json!(age(obj)),
        ]
    },
};
