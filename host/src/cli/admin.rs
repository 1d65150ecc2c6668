//! `portcullis admin`: the approvals page and API of a stdio deployment,
//! on its own listener.

use crate::admin::{Admin, ConfigFile, Deployment};
use crate::config::Config;
use crate::http;
use anyhow::{Result, bail};
use std::sync::Arc;

/// `portcullis admin`: the approvals page and API of a stdio deployment.
pub fn command(config_path: &std::path::Path, listen: Option<std::net::SocketAddr>) -> Result<i32> {
    let config = Config::load(config_path)?;
    if config.approvers.is_empty() {
        bail!(
            "{}: no [approvers.NAME] is configured, so nobody could sign in",
            config_path.display()
        );
    }
    let Some(listen) = listen.or(config.admin.as_ref().map(|a| a.listen)) else {
        bail!(
            "{}: give [admin] listen, or --listen",
            config_path.display()
        );
    };
    let admin = Arc::new(Admin::new(
        &config,
        Deployment::File(ConfigFile::open(config_path)?),
    ));
    let runtime = http::runtime()?;
    runtime.block_on(async {
        let socket = http::bind(listen).await?;
        admin.run(socket, super::shutdown_signal()).await
    })?;
    Ok(0)
}
