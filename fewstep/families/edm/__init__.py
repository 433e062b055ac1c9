"""The EDM family: a class-conditional UNet with EDM preconditioning, trained here from real data (the embedded
digits default, image folders, `datasets`)."""
