//! The cluster PKI, shared by the controller, the agent and `rctl`: the cluster CA and node
//! certificates that carry their role (`ca`), join tokens pinning the CA, and the TLS
//! configurations every gRPC connection uses (`tls`).

pub mod ca;
pub mod join;
pub mod renew;
pub mod tls;
