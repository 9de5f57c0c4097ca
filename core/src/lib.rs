//! What podwire's node agent, CNI plugin, CLI and test lab share, with no eBPF loader and no
//! async runtime: the agent's local API and a blocking client for it ([`api`]), where the datapath
//! is pinned in bpffs ([`pins`]), the names of the programs and maps in the eBPF object
//! ([`object`]), and the model of the cluster ([`cluster`]) and of a pod's endpoint
//! ([`endpoint`]), and the fault points the reliability tests inject failures at ([`fault`]).

pub mod api;
pub mod cluster;
pub mod endpoint;
pub mod fault;
pub mod mac;
pub mod object;
pub mod pins;

/// `error: cause: cause`: an error and its sources on one line, for messages that cross the
/// agent's socket, go into a CNI error's `msg`, or fill one log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}
