//! `vinfra vnfd validate`, `vinfra nsd validate` (ETSI SOL001-style descriptors).

use std::path::PathBuf;

/// Descriptor commands.
#[derive(Debug, clap::Subcommand)]
pub enum DescriptorCmd {
    /// Check a descriptor file and report every error with its path in the file.
    Validate {
        /// The YAML file.
        file: PathBuf,
    },
}

/// `vinfra vnfd …`
pub fn run_vnfd(cmd: DescriptorCmd) -> anyhow::Result<()> {
    match cmd {
        DescriptorCmd::Validate { file } => {
            let v = nfv::descriptor::load_vnfd(&file)?;
            println!(
                "{}: valid VNFD {} ({} VDUs, {} CPs, {} virtual links)",
                file.display(),
                v.id,
                v.vdus.len(),
                v.cps.len(),
                v.virtual_links.len()
            );
            Ok(())
        }
    }
}

/// `vinfra nsd …`
pub fn run_nsd(cmd: DescriptorCmd) -> anyhow::Result<()> {
    match cmd {
        DescriptorCmd::Validate { file } => {
            let (_nsd, vnfds) = nfv::descriptor::load_nsd(&file)?;
            println!("{}: valid NSD over {} VNFDs", file.display(), vnfds.len());
            Ok(())
        }
    }
}
