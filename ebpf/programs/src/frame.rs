//! What the programs need of their context, tc or XDP alike, so parsing and counting are written
//! once.

use aya_ebpf::programs::{TcContext, XdpContext};

pub trait Frame {
    /// Start and end of the packet data the program may read directly.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the packet as counted: skb->len at tc (headers included, also the part not in
    /// the linear data), the frame at XDP.
    fn len(&self) -> u32;
    /// The interface the program runs on.
    fn ifindex(&self) -> u32;
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the kernel hands the program a valid __sk_buff.
        unsafe { (*self.skb.skb).ifindex }
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the kernel hands the program a valid xdp_md.
        unsafe { (*self.ctx).ingress_ifindex }
    }
}
