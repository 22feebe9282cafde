//! One Rudder host: the host config file both daemons read ([`config`]) and the `rudder`
//! command that sets a host up (`init`, `join`), takes it out (`leave`) and checks its config
//! (`config check`), one module per command under [`cmd`]; [`advertise`] picks the address
//! other hosts reach this one at when the config names none.

pub mod advertise;
pub mod cmd;
pub mod config;
