//! The cluster PKI, shared by the controller, the agent and `rctl`: the cluster CA and node
//! certificates that carry their role (`ca`), join tokens pinning the CA, and the TLS
//! configurations every gRPC connection uses (`tls`), and the data-encryption keys that seal a
//! controller's state at rest (`crypt`), and the metrics endpoint both binaries serve (`scrape`).

#![warn(missing_docs)]

pub mod backup;
pub mod ca;
pub mod crypt;
pub mod join;
pub mod renew;
pub mod scrape;
pub mod tls;
