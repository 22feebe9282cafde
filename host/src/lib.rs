//! One Rudder host: the host config file both daemons read ([`config`]) and the `rudder`
//! command that sets a host up (`init`, `join`), takes it out (`leave`) and checks its config
//! (`config check`), one module per command under [`cmd`].

pub mod cmd;
pub mod config;
