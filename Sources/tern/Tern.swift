import ArgumentParser

@main
struct Tern: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tern",
        abstract: "A virtual machine monitor for Linux/KVM built to move running VMs between hosts.",
        subcommands: [Run.self, Migrate.self, MigrateStatus.self, MigrateCancel.self, MigrateSet.self, MigratePostcopy.self, Info.self, Pause.self, Resume.self, Quit.self, Snapshot.self, Memory.self, Certs.self, Token.self, Probe.self, Cluster.self]
    )
}
