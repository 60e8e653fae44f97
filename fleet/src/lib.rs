//! A fleet of meshgate gateways sharing their state on etcd.
//!
//! - `etcd`: the client layer every fleet feature uses: one handle over the members'
//!   endpoints that retries a call on the next member, reports the store's health, watches a
//!   prefix from a revision (resumed on a broken stream, re-listed after a compaction) and
//!   keeps leases alive across broken streams;
//! - `keys`: the key layout under `/meshgate/<name>/`;
//! - `members`: each gateway's record under a lease, and the live member list;
//! - `seal`: the fleet key, which seals private keys before they are stored in etcd;
//! - `acme`: ACME once per fleet (certificates, account, order locks, challenges on etcd);
//! - `error`: the fleet's errors.

pub mod acme;
pub mod error;
pub mod etcd;
pub mod keys;
pub mod members;
pub mod seal;

pub use error::FleetError;
pub use etcd::lease::Lease;
pub use etcd::watch::{Change, PrefixWatch, WatchEvent};
pub use etcd::{Etcd, EtcdOptions, EtcdTls, StoreHealth};
pub use keys::FleetKeys;
pub use members::{MemberRecord, MemberSet};
pub use seal::{FleetKey, SealError};
