from django.db import models


class Site(models.Model):
    id = models.UUIDField(primary_key=True)


class Access(models.Model):
    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="accesses")
    url = models.TextField()
    user_id = models.CharField(max_length=128, db_index=True)
    device = models.CharField(max_length=200, null=True)
    user_agent = models.TextField(null=True)
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)


class AccessContext(models.Model):
    access = models.ForeignKey(Access, on_delete=models.CASCADE, related_name="contexts")
    context = models.CharField(max_length=100, db_index=True)
