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
pub mod operation;
pub mod resource_table;
pub mod server;
pub mod slice;
pub mod storage;
pub mod terminal;
pub mod terminal_connect;
pub mod token;
pub mod traffic;
pub mod up;
pub mod v2x;
pub mod vm;

use crate::output::Format;

/// What every CLI client command needs: where the API is and how to print.
#[derive(Debug)]
pub struct Ctx {
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub format: Format,
}

impl Ctx {
    /// A REST client for the configured server (trusting `--ca-file` for https).
    pub fn client(&self) -> anyhow::Result<client::Client> {
        let (url, token) = crate::locate::endpoint(self.server.clone(), self.token.clone())?;
        self.client_for(&url, &token)
    }

    /// A REST client for `url` with `token` (trusting `--ca-file` for https).
    pub fn client_for(&self, url: &str, token: &str) -> anyhow::Result<client::Client> {
        let (url, token) = (url.to_owned(), token.to_owned());
        match &self.ca_file {
            Some(f) => {
                let ca_pem = std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("cannot read the CA file {}: {e}", f.display()))?;
                let tls = client::ClientTls {
                    ca_pem,
                    identity: None,
                };
                Ok(client::Client::with_tls(&url, &token, &tls)?)
            }
            None => Ok(client::Client::new(&url, &token)?),
        }
    }
}
