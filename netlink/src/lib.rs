//! podwire's netlink operations, through rtnetlink: finding and deleting links
//! ([`Netlink::link`], the one lookup everything uses), a pod's veth pair and addressing ([`pod`]),
//! and the overlay's VXLAN device and routes ([`overlay`]). The CNI plugin wires pods with it, the
//! agent keeps the overlay with it. Errors name the operation and what it was on ([`Op`]).
//!
//! A netlink socket belongs to the network namespace it was opened in: [`Netlink::connect`] opens
//! one in the calling thread's, [`Netlink::connect_in`] one in another namespace. Both need a
//! tokio runtime.

mod error;
mod link;
pub mod overlay;
pub mod pod;

pub use error::{NetlinkError, Op};
pub use link::{disable_ipv6, Link, LinkRef, Netlink};
