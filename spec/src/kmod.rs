//! Kernel module dependencies from `modules.dep` and `modules.softdep` (pure): stage-1 loads
//! its modules in dependency waves, and the image build picks the modules its initramfs needs
//! with them.

use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModulesDepError {
    #[error("modules.dep line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("kernel module {0} is not in the initramfs")]
    UnknownModule(String),
}

/// The module name the kernel uses for a module file (`kernel/drivers/usb/storage/usb-storage.ko`
/// → `usb_storage`).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// A `modules.softdep` line's module name and the words after it; None for other lines.
pub fn softdep_line(line: &str) -> Option<(&str, std::str::SplitWhitespace<'_>)> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("softdep"), Some(name)) => Some((name, words)),
        _ => None,
    }
}

/// A parsed `modules.dep`: module name → (file path, paths of the modules it needs), with the
/// `pre:` soft dependencies of `modules.softdep` where given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModulesDep {
    modules: BTreeMap<String, (String, Vec<String>)>,
    /// Module name → names of modules that must load before it when they load at all
    /// (`softdep ohci_pci pre: ehci_pci`: the kernel warns when EHCI comes after its companions).
    soft_pre: BTreeMap<String, Vec<String>>,
}

impl ModulesDep {
    pub fn parse(text: &str) -> Result<Self, ModulesDepError> {
        let mut modules = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line.split_once(':').ok_or_else(|| ModulesDepError::Line {
                line: i + 1,
                reason: format!("no ':' in {line:?}"),
            })?;
            let path = path.trim();
            if path.is_empty() {
                return Err(ModulesDepError::Line {
                    line: i + 1,
                    reason: "empty module path".into(),
                });
            }
            let deps = deps.split_whitespace().map(str::to_string).collect();
            modules.insert(module_name(path), (path.to_string(), deps));
        }
        Ok(Self {
            modules,
            soft_pre: BTreeMap::new(),
        })
    }

    /// Adds the `pre:` soft dependencies of a `modules.softdep` (as depmod writes it). Other
    /// lines and `post:` lists do not order a load and are skipped.
    pub fn with_softdeps(mut self, text: &str) -> Self {
        for line in text.lines() {
            let Some((name, words)) = softdep_line(line) else {
                continue;
            };
            let pre = words
                .skip_while(|w| *w != "pre:")
                .skip(1)
                .take_while(|w| *w != "post:")
                .map(module_name);
            self.soft_pre
                .entry(module_name(name))
                .or_default()
                .extend(pre);
        }
        self
    }

    pub fn contains(&self, name: &str) -> bool {
        self.modules.contains_key(&name.replace('-', "_"))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// Module files to load for `wanted`, every dependency before its users, each once.
    pub fn load_order<'a>(
        &self,
        wanted: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<String>, ModulesDepError> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in wanted {
            self.visit(&name.replace('-', "_"), &mut seen, &mut order)?;
        }
        Ok(order)
    }

    /// Module files to load for `wanted`, in waves: a module's dependencies (and its soft `pre:`
    /// dependencies that load at all) are all in earlier waves, so one wave's modules may load
    /// at the same time. Within a wave, files keep [`Self::load_order`]'s order.
    pub fn load_waves<'a>(
        &self,
        wanted: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Vec<String>>, ModulesDepError> {
        let order = self.load_order(wanted)?;
        let loading: HashSet<String> = order.iter().map(|p| module_name(p)).collect();
        let mut waves: Vec<Vec<String>> = Vec::new();
        let mut wave_of = HashMap::new();
        for path in order {
            let wave = self.wave(&module_name(&path), &loading, &mut wave_of, &mut Vec::new());
            if waves.len() <= wave {
                waves.resize_with(wave + 1, Vec::new);
            }
            waves[wave].push(path);
        }
        Ok(waves)
    }

    /// The wave `name` loads in: one after the latest of what it waits for. `path` holds the
    /// modules being resolved, so a soft dependency cycle (which depmod does not rule out)
    /// cannot recurse forever.
    fn wave(
        &self,
        name: &str,
        loading: &HashSet<String>,
        wave_of: &mut HashMap<String, usize>,
        path: &mut Vec<String>,
    ) -> usize {
        if let Some(w) = wave_of.get(name) {
            return *w;
        }
        if path.iter().any(|p| p == name) {
            return 0;
        }
        path.push(name.to_string());
        let hard = self
            .modules
            .get(name)
            .into_iter()
            .flat_map(|(_, deps)| deps.iter().map(|d| module_name(d)));
        let soft = self.soft_pre.get(name).into_iter().flatten().cloned();
        let wave = hard
            .chain(soft)
            .filter(|d| loading.contains(d))
            .map(|d| self.wave(&d, loading, wave_of, path) + 1)
            .max()
            .unwrap_or(0);
        path.pop();
        wave_of.insert(name.to_string(), wave);
        wave
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModulesDepError> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let (path, deps) = self
            .modules
            .get(name)
            .ok_or_else(|| ModulesDepError::UnknownModule(name.to_string()))?;
        // modules.dep lists the deepest dependencies last: walk it backwards so the order
        // follows modprobe's even before the recursion sorts out the rest.
        for dep in deps.iter().rev() {
            self.visit(&module_name(dep), seen, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/isofs/isofs.ko: kernel/drivers/cdrom/cdrom.ko
kernel/drivers/cdrom/cdrom.ko:
kernel/drivers/scsi/sr_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko kernel/drivers/cdrom/cdrom.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/usb/storage/usb-storage.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
";

    #[test]
    fn modules_dep_orders_dependencies_first() {
        let deps = ModulesDep::parse(DEP).unwrap();
        let order = deps.load_order(["sr_mod", "isofs", "usb-storage"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/cdrom/cdrom.ko",
                "kernel/drivers/scsi/scsi_common.ko",
                "kernel/drivers/scsi/scsi_mod.ko",
                "kernel/drivers/scsi/sr_mod.ko",
                "kernel/fs/isofs/isofs.ko",
                "kernel/drivers/usb/storage/usb-storage.ko",
            ]
        );
        assert!(deps.contains("usb-storage"));
        assert!(matches!(
            deps.load_order(["nope"]),
            Err(ModulesDepError::UnknownModule(n)) if n == "nope"
        ));
    }

    #[test]
    fn waves_load_dependencies_and_soft_predecessors_first() {
        let deps = ModulesDep::parse(&format!(
            "{DEP}kernel/drivers/usb/host/ehci-pci.ko:\n\
             kernel/drivers/usb/host/ohci-pci.ko:\n\
             kernel/drivers/usb/host/uhci-hcd.ko:\n"
        ))
        .unwrap()
        .with_softdeps(
            "# Soft dependencies extracted from modules themselves.\n\
             softdep ohci_pci pre: ehci_pci\n\
             softdep uhci_hcd pre: ehci_pci post: nothing_loaded\n\
             softdep ext4 pre: crypto-crc32c\n\
             softdep cifs gcm\n",
        );
        let waves = deps
            .load_waves([
                "uhci_hcd",
                "ohci_pci",
                "ehci_pci",
                "usb-storage",
                "sr_mod",
                "isofs",
            ])
            .unwrap();
        assert_eq!(
            waves,
            [
                vec![
                    "kernel/drivers/usb/host/ehci-pci.ko",
                    "kernel/drivers/scsi/scsi_common.ko",
                    "kernel/drivers/cdrom/cdrom.ko",
                ],
                vec![
                    "kernel/drivers/usb/host/uhci-hcd.ko",
                    "kernel/drivers/usb/host/ohci-pci.ko",
                    "kernel/drivers/scsi/scsi_mod.ko",
                    "kernel/fs/isofs/isofs.ko",
                ],
                vec![
                    "kernel/drivers/usb/storage/usb-storage.ko",
                    "kernel/drivers/scsi/sr_mod.ko",
                ],
            ]
        );
        // Without ehci_pci in the load, its companions wait for nothing.
        let waves = deps.load_waves(["ohci_pci"]).unwrap();
        assert_eq!(waves, [vec!["kernel/drivers/usb/host/ohci-pci.ko"]]);
        // A soft cycle still loads everything, once.
        let cyclic = ModulesDep::parse("a.ko:\nb.ko:\n")
            .unwrap()
            .with_softdeps("softdep a pre: b\nsoftdep b pre: a\n");
        let all: Vec<String> = cyclic.load_waves(["a", "b"]).unwrap().concat();
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn modules_dep_rejects_garbage() {
        assert!(matches!(
            ModulesDep::parse("ok.ko:\nbroken line\n"),
            Err(ModulesDepError::Line { line: 2, .. })
        ));
        assert_eq!(module_name("kernel/x/usb-storage.ko.xz"), "usb_storage");
    }
}
