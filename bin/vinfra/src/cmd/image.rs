//! `vinfra image …` and the default guest image of `vinfra up`.

use std::path::Path;

use anyhow::Context;
use compute::GuestImage;
use model::api::CreateImage;

use crate::cmd::Ctx;
use crate::{output, progress};

/// Name of the image `vinfra up` registers.
pub const DEFAULT_IMAGE: &str = "default";

/// Image commands.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCmd {
    /// List images.
    List,
}

/// Runs an image command.
pub async fn run(ctx: &Ctx, cmd: ImageCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        ImageCmd::List => {
            let images = c.list_images().await?;
            output::emit(
                ctx.format,
                &images,
                &["name", "public", "disk", "kernel"],
                || {
                    images
                        .iter()
                        .map(|i| {
                            vec![
                                i.name.to_string(),
                                i.tenant.is_none().to_string(),
                                format!("{} MiB", i.disk_mib),
                                i.kernel.clone().unwrap_or_default(),
                            ]
                        })
                        .collect()
                },
            )
        }
    }
}

/// Builds the default guest image under `<data_dir>/images` or finds it there.
pub async fn ensure_default(data_dir: &Path) -> anyhow::Result<GuestImage> {
    let cache = data_dir.join("images");
    let bar = progress::spinner("guest image");
    let bar2 = bar.clone();
    let img = tokio::task::spawn_blocking(move || {
        compute::ensure_default_image(&cache, |line| {
            bar2.set_message(format!("guest image: {line}"))
        })
    })
    .await
    .context("the image builder panicked")?
    .context("cannot build the default guest image")?;
    bar.finish_with_message(format!("guest image ready ({})", img.kernel_package));
    Ok(img)
}

/// Registers the default image as a public image, unless it exists.
pub async fn register_default(c: &client::Client, img: &GuestImage) -> anyhow::Result<()> {
    if c.get_image(DEFAULT_IMAGE).await.is_ok() {
        return Ok(());
    }
    let disk_mib = std::fs::metadata(&img.disk_template)
        .with_context(|| format!("cannot stat {}", img.disk_template.display()))?
        .len()
        >> 20;
    c.create_image(&CreateImage {
        name: DEFAULT_IMAGE.to_owned(),
        kernel: Some(img.kernel.display().to_string()),
        initrd: Some(img.initrd.display().to_string()),
        disk_template: Some(img.disk_template.display().to_string()),
        cmdline: img.cmdline.clone(),
        disk_mib,
        tenant: None,
    })
    .await
    .context("cannot register the default image")?;
    Ok(())
}
