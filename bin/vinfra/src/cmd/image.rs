//! `vinfra image …` and the default guest image of `vinfra up`.

use std::path::{Path, PathBuf};

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
    /// Upload local files into the image store (streamed, checksummed) and make an
    /// image of them.
    Upload {
        /// Image name.
        name: String,
        #[command(flatten)]
        files: FileArgs,
        #[command(flatten)]
        meta: ImageMeta,
    },
    /// Admin: make an image of files in the server's import directory
    /// (`vinfra server --image-import-dir`); paths are relative to it.
    Import {
        /// Image name.
        name: String,
        /// Kernel, relative to the import directory.
        #[arg(long)]
        kernel: Option<String>,
        /// Initrd, relative to the import directory.
        #[arg(long)]
        initrd: Option<String>,
        /// Disk template, relative to the import directory.
        #[arg(long)]
        disk: Option<String>,
        #[command(flatten)]
        meta: ImageMeta,
    },
    /// Build one of vinfra's guest images offline from Debian packages (cached; rebuilt
    /// when its builder changes) and upload it: `default` (a Debian kernel and a busybox
    /// initramfs whose init runs a disk workload) or `debian` (systemd, PostgreSQL 15
    /// with pgbench, and fio on an ext4 root; `vinfra.workload=pgbench|fio` on the
    /// kernel command line, see docs/CACHE.md).
    Build {
        /// Which image: default or debian.
        #[arg(default_value = DEFAULT_IMAGE, value_parser = parse_kind)]
        kind: compute::GuestKind,
        /// Image name (default: the kind's name).
        #[arg(long)]
        name: Option<String>,
        /// Admin: the tenant that owns it (an admin's image is public otherwise).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Delete an image no VM uses.
    Delete {
        /// Image name or id.
        name: String,
    },
}

/// Local files of an image.
#[derive(Debug, clap::Args)]
pub struct FileArgs {
    /// Kernel (direct kernel boot).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Disk template each VM's disk is cloned from.
    #[arg(long)]
    disk: Option<PathBuf>,
}

/// What an image is besides its files.
#[derive(Debug, clap::Args)]
pub struct ImageMeta {
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Size of each VM's disk, MiB (default: the disk template's size, or 64).
    #[arg(long)]
    disk_mib: Option<u64>,
    /// Admin: the tenant that owns it (an admin's image is public otherwise).
    #[arg(long)]
    tenant: Option<String>,
}

impl ImageMeta {
    fn request(self, name: String, template_bytes: Option<u64>) -> CreateImage {
        CreateImage {
            name,
            kernel: None,
            initrd: None,
            disk_template: None,
            cmdline: self.cmdline,
            disk_mib: self
                .disk_mib
                .or(template_bytes.map(|b| b.div_ceil(1 << 20)))
                .unwrap_or(64),
            tenant: self.tenant,
        }
    }
}

/// Runs an image command.
pub async fn run(ctx: &Ctx, cmd: ImageCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        ImageCmd::Upload { name, files, meta } => {
            let template_bytes = match &files.disk {
                Some(d) => Some(
                    std::fs::metadata(d)
                        .with_context(|| format!("cannot stat {}", d.display()))?
                        .len(),
                ),
                None => None,
            };
            let files = client::ImageFiles {
                kernel: files.kernel,
                initrd: files.initrd,
                disk_template: files.disk,
            };
            let bar = progress::spinner("uploading image files");
            let img = c
                .upload_image(&files, meta.request(name, template_bytes))
                .await;
            bar.finish_and_clear();
            show(ctx, &img?)
        }
        ImageCmd::Import {
            name,
            kernel,
            initrd,
            disk,
            meta,
        } => {
            let digest = async |p: Option<String>| -> anyhow::Result<Option<(String, u64)>> {
                match p {
                    Some(p) => {
                        let b = c.import_blob(&p).await?;
                        Ok(Some((b.digest.to_string(), b.size)))
                    }
                    None => Ok(None),
                }
            };
            let kernel = digest(kernel).await?;
            let initrd = digest(initrd).await?;
            let disk = digest(disk).await?;
            let mut req = meta.request(name, disk.as_ref().map(|d| d.1));
            req.kernel = kernel.map(|d| d.0);
            req.initrd = initrd.map(|d| d.0);
            req.disk_template = disk.map(|d| d.0);
            show(ctx, &c.create_image(&req).await?)
        }
        ImageCmd::Build { kind, name, tenant } => {
            // Built where the tests build it too (VINFRA_GUEST_CACHE or /var/cache/vinfra/guest).
            let img = ensure(kind, &compute::default_cache_dir()).await?;
            let name = name.unwrap_or_else(|| kind.name().to_owned());
            let bar = progress::spinner(format!("uploading image {name}"));
            let up = upload_guest(&c, &img, &name, tenant).await;
            bar.finish_and_clear();
            show(ctx, &up?)
        }
        ImageCmd::Delete { name } => {
            c.delete_image(&name).await?;
            println!("image {name} deleted");
            Ok(())
        }
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

fn parse_kind(s: &str) -> Result<compute::GuestKind, String> {
    compute::GuestKind::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = compute::GuestKind::ALL.iter().map(|k| k.name()).collect();
        format!("no guest image '{s}': one of {}", names.join(", "))
    })
}

/// Builds the default guest image in `cache` or finds it there.
pub async fn ensure_default(cache: &Path) -> anyhow::Result<GuestImage> {
    ensure(compute::GuestKind::Default, cache).await
}

/// Builds the guest image of `kind` in `cache` or finds it there.
pub async fn ensure(kind: compute::GuestKind, cache: &Path) -> anyhow::Result<GuestImage> {
    let cache = cache.to_owned();
    let bar = progress::spinner(format!("guest image {kind}"));
    let bar2 = bar.clone();
    let img = tokio::task::spawn_blocking(move || {
        compute::ensure_image(kind, &cache, |line| {
            bar2.set_message(format!("guest image {kind}: {line}"))
        })
    })
    .await
    .context("the image builder panicked")?
    .with_context(|| format!("cannot build the {kind} guest image"))?;
    bar.finish_with_message(format!("guest image ready ({})", img.kernel_package));
    Ok(img)
}

fn show(ctx: &Ctx, img: &model::Image) -> anyhow::Result<()> {
    output::emit(ctx.format, img, &["name", "id", "disk"], || {
        vec![vec![
            img.name.to_string(),
            img.id.to_string(),
            format!("{} MiB", img.disk_mib),
        ]]
    })
}

/// Uploads the built guest image's files and makes image `name` of them.
pub async fn upload_guest(
    c: &client::Client,
    img: &GuestImage,
    name: &str,
    tenant: Option<String>,
) -> anyhow::Result<model::Image> {
    let disk_mib = std::fs::metadata(&img.disk_template)
        .with_context(|| format!("cannot stat {}", img.disk_template.display()))?
        .len()
        >> 20;
    let files = client::ImageFiles {
        kernel: Some(img.kernel.clone()),
        initrd: Some(img.initrd.clone()),
        disk_template: Some(img.disk_template.clone()),
    };
    let req = CreateImage {
        name: name.to_owned(),
        kernel: None,
        initrd: None,
        disk_template: None,
        cmdline: img.cmdline.clone(),
        disk_mib,
        tenant,
    };
    c.upload_image(&files, req)
        .await
        .with_context(|| format!("cannot upload image {name}"))
}

/// Uploads the default image as a public image, unless it exists. The sim driver
/// boots any image; QEMU cannot boot the sim driver's placeholder, so a data dir that
/// `vinfra up --driver sim` made is refused for QEMU hosts.
pub async fn register_default(
    c: &client::Client,
    img: &GuestImage,
    driver: crate::cmd::agent::DriverKind,
) -> anyhow::Result<()> {
    if let Ok(existing) = c.get_image(DEFAULT_IMAGE).await {
        let placeholder = existing
            .cmdline
            .split_whitespace()
            .any(|w| w == compute::sim::SIM_IMAGE_MARK);
        if placeholder && driver == crate::cmd::agent::DriverKind::Qemu {
            anyhow::bail!(
                "image {DEFAULT_IMAGE} in this data dir is the sim driver's placeholder, which \
                 QEMU cannot boot: use another --data-dir, or `vinfra up --driver sim`"
            );
        }
        return Ok(());
    }
    upload_guest(c, img, DEFAULT_IMAGE, None).await?;
    Ok(())
}
