//! The datapath's maps, typed: what the agent writes, the CLI reads and the tests check, through
//! one set of types. Each is opened either from a loaded object ([`crate::Datapath`]) or from its
//! pin, with or without the agent running. The kernel's record of a map's type and key and value
//! sizes must match the type here, so a map pinned by an incompatible agent is refused rather
//! than misread.

use std::{
    io::ErrorKind,
    net::Ipv4Addr,
    os::fd::{AsFd, BorrowedFd},
    path::PathBuf,
};

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    HashMap, Map, MapData, PerCpuArray, RingBuf,
};
use ipnet::Ipv4Net;
use podwire_common::{Counter, DropEvent, Endpoint, EndpointKey, NodeEntry, Reason};
use podwire_core::{object::maps as names, pins::Pins};

/// Errors of opening, reading and writing the datapath's maps.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// Nothing is pinned at the map's path: no agent ever ran with this pin root.
    #[error(
        "no pinned map at {path}: is the podwire agent running on this node with --bpffs {root}, \
         or was it ever started?"
    )]
    NotPinned {
        path: PathBuf,
        root: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// The kernel refused the pin: not root, or the path is not a pinned BPF object (the kernel
    /// answers EACCES for both).
    #[error(
        "cannot open the pinned map {path}: run podwire as root on the node, and check that \
         {root} is the agent's --bpffs on a bpf filesystem"
    )]
    Denied {
        path: PathBuf,
        root: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// Opening the pin failed otherwise.
    #[error("opening the pinned map {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// The pinned map has another type, key or value size than this build reads.
    #[error(
        "{path} is not the map this podwire reads: was it pinned by an incompatible agent version?"
    )]
    Incompatible {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// The loaded object lacks the map, or holds it with another layout: agent and object are
    /// out of step.
    #[error("the eBPF object has no map {name} of the layout this build reads")]
    NotInObject {
        name: &'static str,
        #[source]
        source: Option<Box<aya::maps::MapError>>,
    },
    /// An item on the event ring is too short for an event: its writer has another layout.
    #[error("malformed event on the ring {name}: {len} bytes")]
    ShortEvent { name: &'static str, len: usize },
    /// Reading or writing an entry failed.
    #[error("map {name}")]
    Access {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// One of the datapath's maps: its name in the object and in bpffs, and how to type it.
pub trait DatapathMap: Sized {
    /// The map's name (one of [`podwire_core::object::maps`]).
    const NAME: &'static str;

    /// Types an untyped map, checking its type and key and value sizes.
    fn typed(map: Map) -> Result<Self, aya::maps::MapError>;

    /// Opens the map pinned below `pins`.
    fn open(pins: &Pins) -> Result<Self, MapError> {
        let path = pins.map(Self::NAME);
        let root = pins.root().to_path_buf();
        let data = MapData::from_pin(&path).map_err(|source| {
            let kind = match &source {
                aya::maps::MapError::SyscallError(s) => Some(s.io_error.kind()),
                _ => None,
            };
            match kind {
                Some(ErrorKind::NotFound) => MapError::NotPinned {
                    path: path.clone(),
                    root: root.clone(),
                    source: source.into(),
                },
                Some(ErrorKind::PermissionDenied) => MapError::Denied {
                    path: path.clone(),
                    root: root.clone(),
                    source: source.into(),
                },
                _ => MapError::Open {
                    path: path.clone(),
                    source: source.into(),
                },
            }
        })?;
        Map::from_map_data(data)
            .and_then(Self::typed)
            .map_err(|source| MapError::Incompatible {
                path,
                source: source.into(),
            })
    }

    /// Takes the map out of a loaded object.
    fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MapError> {
        let map = ebpf.take_map(Self::NAME).ok_or(MapError::NotInObject {
            name: Self::NAME,
            source: None,
        })?;
        Self::typed(map).map_err(|source| MapError::NotInObject {
            name: Self::NAME,
            source: Some(source.into()),
        })
    }
}

fn access(name: &'static str) -> impl Fn(aya::maps::MapError) -> MapError {
    move |source| MapError::Access {
        name,
        source: source.into(),
    }
}

/// `Ok(())` for a key that was not there (the kernel's ENOENT): removing is idempotent.
fn removed(result: Result<(), aya::maps::MapError>, name: &'static str) -> Result<(), MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(access(name)(source)),
    }
}

/// `ENDPOINTS_V2`: the pods on this node by IPv4 address.
pub struct Endpoints(HashMap<MapData, EndpointKey, Endpoint>);

impl DatapathMap for Endpoints {
    const NAME: &'static str = names::ENDPOINTS;

    fn typed(map: Map) -> Result<Self, aya::maps::MapError> {
        HashMap::try_from(map).map(Endpoints)
    }
}

impl Endpoints {
    /// The endpoint of `ip`, if the map has one.
    pub fn get(&self, ip: Ipv4Addr) -> Result<Option<Endpoint>, MapError> {
        match self.0.get(&ip.octets(), 0) {
            Ok(endpoint) => Ok(Some(endpoint)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(access(Self::NAME)(source)),
        }
    }

    /// Every endpoint, by address.
    pub fn list(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>, MapError> {
        let mut all = self
            .0
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, ep)| (Ipv4Addr::from(key), ep))
                    .map_err(access(Self::NAME))
            })
            .collect::<Result<Vec<_>, _>>()?;
        all.sort_by_key(|(ip, _)| *ip);
        Ok(all)
    }

    /// Writes (or replaces) the endpoint of `ip`.
    pub fn set(&mut self, ip: Ipv4Addr, endpoint: Endpoint) -> Result<(), MapError> {
        self.0
            .insert(ip.octets(), endpoint, 0)
            .map_err(access(Self::NAME))
    }

    /// Removes the endpoint of `ip`, if there is one.
    pub fn remove(&mut self, ip: Ipv4Addr) -> Result<(), MapError> {
        removed(self.0.remove(&ip.octets()), Self::NAME)
    }
}

/// `NODES_V1`: pod CIDRs and underlay addresses to the node owning them, longest prefix first.
pub struct NodeTable(LpmTrie<MapData, [u8; 4], NodeEntry>);

impl DatapathMap for NodeTable {
    const NAME: &'static str = names::NODES;

    fn typed(map: Map) -> Result<Self, aya::maps::MapError> {
        LpmTrie::try_from(map).map(NodeTable)
    }
}

fn lpm_key(net: Ipv4Net) -> LpmKey<[u8; 4]> {
    LpmKey::new(u32::from(net.prefix_len()), net.network().octets())
}

impl NodeTable {
    /// Every entry, longest prefix first, then by address.
    pub fn list(&self) -> Result<Vec<(Ipv4Net, NodeEntry)>, MapError> {
        let mut all = self
            .0
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, node)| {
                        let net = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)
                            .expect("the kernel keeps prefixes within 32 bits");
                        (net, node)
                    })
                    .map_err(access(Self::NAME))
            })
            .collect::<Result<Vec<_>, _>>()?;
        all.sort_by(|(a, _), (b, _)| {
            b.prefix_len()
                .cmp(&a.prefix_len())
                .then(a.network().cmp(&b.network()))
        });
        Ok(all)
    }

    /// Writes (or replaces) the entry of `net`.
    pub fn set(&mut self, net: Ipv4Net, node: NodeEntry) -> Result<(), MapError> {
        self.0
            .insert(&lpm_key(net), node, 0)
            .map_err(access(Self::NAME))
    }

    /// Removes the entry of `net`, if there is one.
    pub fn remove(&mut self, net: Ipv4Net) -> Result<(), MapError> {
        removed(self.0.remove(&lpm_key(net)), Self::NAME)
    }
}

/// `COUNTERS`: packets and bytes per verdict reason, per CPU.
pub struct Counters(PerCpuArray<MapData, Counter>);

impl DatapathMap for Counters {
    const NAME: &'static str = names::COUNTERS;

    fn typed(map: Map) -> Result<Self, aya::maps::MapError> {
        PerCpuArray::try_from(map).map(Counters)
    }
}

impl Counters {
    /// The count of `reason`, summed over CPUs.
    pub fn get(&self, reason: Reason) -> Result<Counter, MapError> {
        let per_cpu = self
            .0
            .get(&(reason as u32), 0)
            .map_err(access(Self::NAME))?;
        Ok(per_cpu.iter().copied().sum())
    }

    /// Every reason's count, summed over CPUs, in [`Reason::ALL`] order.
    pub fn all(&self) -> Result<Vec<(Reason, Counter)>, MapError> {
        Reason::ALL
            .into_iter()
            .map(|reason| Ok((reason, self.get(reason)?)))
            .collect()
    }
}

/// `EVENTS_V1`: the ring of dropped packets. One reader at a time: what one reads is gone for
/// another.
pub struct DropEvents(RingBuf<MapData>);

impl DatapathMap for DropEvents {
    const NAME: &'static str = names::EVENTS;

    fn typed(map: Map) -> Result<Self, aya::maps::MapError> {
        RingBuf::try_from(map).map(DropEvents)
    }
}

impl DropEvents {
    /// Takes the next event off the ring, if there is one.
    pub fn pop(&mut self) -> Result<Option<DropEvent>, MapError> {
        let Some(item) = self.0.next() else {
            return Ok(None);
        };
        if item.len() < std::mem::size_of::<DropEvent>() {
            return Err(MapError::ShortEvent {
                name: Self::NAME,
                len: item.len(),
            });
        }
        // SAFETY: DropEvent is plain old data and the item holds enough bytes; read_unaligned
        // because the ring promises no alignment for this type.
        Ok(Some(unsafe {
            std::ptr::read_unaligned(item.as_ptr().cast::<DropEvent>())
        }))
    }
}

/// Readable when events are waiting: poll it between calls to [`DropEvents::pop`].
impl AsFd for DropEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
