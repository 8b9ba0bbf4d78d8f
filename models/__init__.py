"""Model packages. Each subpackage exports PACKAGE (a runtime.package.ModelPackage); runtime.registry finds them."""
