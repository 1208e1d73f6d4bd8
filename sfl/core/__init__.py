"""The torch-free core: storage layout, the update header, configuration, the names users choose,
and the torch-free strategies (selection, quorum). Runs everywhere; imports only the standard
library, boto3's serializers and nothing else of ``sfl``."""
