"""The test suite, by layer: unit/ (pure logic, no torch), agent/ (one SFT agent and its data),
population/ (members trained together, in this process or on Ray), integration/ (the product as a
user runs it: command line, clusters, servers, browser, docker files).

A package, so that test modules of the same name in different folders do not clash and the
shared helpers import as `tests.helpers.*`."""
