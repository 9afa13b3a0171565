//! Kernel module dependencies from `modules.dep` (pure): stage-1 loads its modules in this
//! order, and the image build picks the modules its initramfs needs with it.

use std::collections::{BTreeMap, HashSet};

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

/// A parsed `modules.dep`: module name → (file path, paths of the modules it needs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModulesDep {
    modules: BTreeMap<String, (String, Vec<String>)>,
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
        Ok(Self { modules })
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
    fn modules_dep_rejects_garbage() {
        assert!(matches!(
            ModulesDep::parse("ok.ko:\nbroken line\n"),
            Err(ModulesDepError::Line { line: 2, .. })
        ));
        assert_eq!(module_name("kernel/x/usb-storage.ko.xz"), "usb_storage");
    }
}
