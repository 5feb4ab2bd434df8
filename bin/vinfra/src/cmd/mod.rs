//! One module per top-level command.

pub mod agent;
pub mod bench;
pub mod host;
pub mod image;
pub mod maintenance;
pub mod migration;
pub mod nbd;
pub mod network;
pub mod nfv;
pub mod server;
pub mod storage;
pub mod token;
pub mod traffic;
pub mod up;
pub mod vm;

use crate::output::Format;

/// What every CLI client command needs: where the API is and how to print.
#[derive(Debug)]
pub struct Ctx {
    pub server: Option<String>,
    pub token: Option<String>,
    pub format: Format,
}

impl Ctx {
    /// A REST client for the configured server.
    pub fn client(&self) -> anyhow::Result<client::Client> {
        let (url, token) = crate::locate::endpoint(self.server.clone(), self.token.clone())?;
        Ok(client::Client::new(&url, &token)?)
    }
}
