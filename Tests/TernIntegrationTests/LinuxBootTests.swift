import Foundation
import Glibc
import Testing
import TernMachine

/// Debian's cloud kernel (installed by scripts/setup.sh) booted with the Linux
/// 64-bit boot protocol. On this PVM host ring 0 is emulated, so Linux gets
/// only through early boot (shared/PLATFORM.md): the test is its banner and
/// early lines on the serial console, within a time budget.
/// The newest Debian cloud kernel in /boot (scripts/setup.sh installs linux-image-cloud-amd64).
func debianCloudKernel() -> String? {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/boot")) ?? []
    return names.filter { $0.hasPrefix("vmlinuz-") && $0.contains("cloud-amd64") }.sorted().last.map { "/boot/" + $0 }
}

@Suite(.enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct LinuxBootTests {
    @Test func debiansCloudKernelPrintsItsBannerAndMemoryMap() throws {
        let kernel = try #require(debianCloudKernel(), "no Debian cloud kernel in /boot: run scripts/setup.sh")
        let directory = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("tern-linux-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let console = directory.appendingPathComponent("console.log").path
        let initrd = kernel.replacingOccurrences(of: "vmlinuz-", with: "initrd.img-")
        let disk = TestDisk(size: 1 << 20, in: directory)
        var arguments = ["run", "--kernel", kernel, "--memory", "512M", "--serial", "file:\(console)", "--disk", "path=\(disk.path)",
                         "--cmdline", "console=ttyS0 earlyprintk=ttyS0 panic=-1 tern.test=marker"]
        if FileManager.default.fileExists(atPath: initrd) { arguments += ["--initrd", initrd] }
        let tern = try TernProcess(arguments)
        try tern.waitForAPI()
        let started = Date()
        var log = ""
        while Date().timeIntervalSince(started) < 150 {
            log = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
            if log.contains("BIOS-e820") && log.contains("Command line:") { break }
            guard tern.process.isRunning else { break }
            sleep(1)
        }
        print("Linux banner after \(String(format: "%.0f", Date().timeIntervalSince(started))) s")
        #expect(log.contains("Linux version "), "no banner on the serial console: \(log.prefix(500)); stderr: \(tern.stderr)")
        #expect(log.contains("tern.test=marker"), "the command line reached the kernel")
        #expect(log.contains("virtio_mmio.device=512@0xfeb00000:5"), "the disk is named on the command line, where Linux looks for virtio-mmio devices")
        #expect(log.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"), "the e820 map reached the kernel")
        #expect(log.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"))
        _ = try? tern.client.request(.PUT, "/v1/vm/quit")
    }
}
