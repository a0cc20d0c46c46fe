//! The decapsulation program for backend hosts and its maps.

use std::net::Ipv4Addr;

use aya::{
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp},
    Ebpf, EbpfError,
};
use lb_common::stats::GlobalStats;

use crate::objects;

pub const PROGRAM: &str = "lb_decap";

#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error("failed to load the decapsulation object")]
    Load(#[from] EbpfError),
    #[error("failed to load program {PROGRAM}")]
    Program(#[from] ProgramError),
    #[error("map {0}")]
    Map(&'static str, #[source] MapError),
}

pub struct Decap {
    ebpf: Ebpf,
    addrs: HashMap<MapData, [u8; 4], u32>,
    stats: PerCpuArray<MapData, GlobalStats>,
}

impl Decap {
    pub fn load() -> Result<Self, DecapError> {
        let mut ebpf = Ebpf::load(objects::decap())?;
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM).expect("in object").try_into()?;
        prog.load()?;
        let addrs = HashMap::try_from(ebpf.take_map("DECAP_ADDRS").expect("in object"))
            .map_err(|e| DecapError::Map("DECAP_ADDRS", e))?;
        let stats = PerCpuArray::try_from(ebpf.take_map("STATS").expect("in object"))
            .map_err(|e| DecapError::Map("STATS", e))?;
        Ok(Self { ebpf, addrs, stats })
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf.program(PROGRAM).expect("loaded").try_into().expect("xdp")
    }

    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf.program_mut(PROGRAM).expect("loaded").try_into().expect("xdp")
    }

    /// Decapsulate IPIP packets whose outer destination is `addr`.
    pub fn add_local_address(&mut self, addr: Ipv4Addr) -> Result<(), DecapError> {
        self.addrs.insert(addr.octets(), 1, 0).map_err(|e| DecapError::Map("DECAP_ADDRS", e))
    }

    pub fn stats(&self) -> Result<GlobalStats, DecapError> {
        let per_cpu = self.stats.get(&0, 0).map_err(|e| DecapError::Map("STATS", e))?;
        Ok(GlobalStats::sum(per_cpu.iter()))
    }
}
